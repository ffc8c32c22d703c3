"""Family-agnostic editing machinery shared by every method.

* ``template``: the method template every apply runs through (hparams, adapter, requests, the
  ``copy`` / ``return_orig_weights`` / ``keep_original_weight`` flags, undo on failure, stats).
* ``requests``: normalise EasyEdit requests (dict or list), check fields, read optional ones.
* ``hooks``: capture / intervene on activations at adapter hook points; persistent hook sets.
* ``snapshot``: exact weight snapshots, the ``RestoreHandle`` EasyEdit calls, state comparison.
* ``deltas``: trainable fp32 value-column deltas applied by hook and folded exactly.
* ``neurons``: T-Patcher-style key-value neuron blocks kept outside the module tree; ``neuron_stack``
  runs a layer's finished blocks as one.
* ``scope``: input scopes, so a finished edit acts only at positions close to its own (lifelong mode).
* ``routing``: edits kept apart and routed per input row by a first pass (lifelong mode for edits
  that act at every position); ``RoutedModel`` is their ``edited_model``.
* ``replay`` / ``layer_memo``: re-run only the decoder layers an edit can change (speed only).
* ``wrap``: named gates and ``GatedModel``, the ``edited_model`` of hook-based methods.
* ``finite``: ``check_finite``, one call per optimisation step, stops a loss gone inf/nan.
* ``scoring``: metrics (owned by the bench).
"""
