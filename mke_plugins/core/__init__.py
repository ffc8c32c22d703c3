"""Family-agnostic editing machinery shared by every method.

* ``template``: the method template every apply runs through (hparams, adapter, requests, the
  ``copy`` / ``return_orig_weights`` / ``keep_original_weight`` flags, undo on failure, stats).
* ``requests``: normalise EasyEdit requests (dict or list), check fields, read optional ones.
* ``hooks``: capture / intervene on activations at adapter hook points; persistent hook sets.
* ``snapshot``: exact weight snapshots, the ``RestoreHandle`` EasyEdit calls, state comparison.
* ``deltas``: trainable fp32 value-column deltas applied by hook and folded exactly.
* ``neurons``: T-Patcher-style key-value neuron blocks kept outside the module tree.
* ``wrap``: named gates and ``GatedModel``, the ``edited_model`` of hook-based methods.
* ``finite``: ``check_finite``, one call per optimisation step, stops a loss gone inf/nan.
* ``scoring``: metrics (owned by the bench).
"""
