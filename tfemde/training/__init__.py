"""Training: a run folder made by `train` (data, tokenizer, `model.fit`, checkpoints, curves, test metrics).

* `runs`: `train` and the run-folder bookkeeping (identity, resuming, `metrics.json`);
* `callbacks`: `RetrievalValidation` (validation RSUM after each epoch), `BestCheckpoint`, `WorkerBackupAndRestore`;
* `distribute`: the `tf.distribute` strategy a name means (`make_strategy`) and which worker writes (`is_chief`);
* `plots`: training curves and retrieval pictures as PNG.

Reading a finished run folder back is `tfemde.models.run_folder` (`open_run`), which evaluation and export use too.
"""
