"""FT baseline: fine-tune one decoder layer's FFN value matrix on the paired edit query."""
