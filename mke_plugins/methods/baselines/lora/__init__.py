"""LoRA baseline: peft LoRA adapters on one decoder layer, trained on the paired edit query."""
