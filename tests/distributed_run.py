"""Processes that tests/test_distribute.py starts: TensorFlow's devices and cluster are fixed at process start.

`python tests/distributed_run.py mirrored` trains the same models on one device and under a MirroredStrategy over
two logical CPUs and prints, per case, the losses and weights of both as JSON.
`python tests/distributed_run.py worker OUT DATA EPOCHS [KILL_AT_EPOCH]` is one worker of a cluster (TF_CONFIG):
it trains with `tfemde.training.train(strategy="multi_worker")`, prints the first epoch it ran, and exits hard at
the end of the first batch of epoch KILL_AT_EPOCH when it is worker 1 (a killed process, no clean-up).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

TINY = dict(embed_dim=16, word_dim=8, num_slots=2, set_depth=1, set_heads=2, sketch_depth=2, sketch_bits=3,
            image_size=16, cnn_filters=(4, 8), max_length=12, dropout=0.0, vocab_size=40)
# preset, image input, config overrides: every loss path (hardest-negative triplet after a VSE0 epoch, InfoNCE),
# set and vector heads, the sketch, the MMD and diversity terms, masked regions (masked batch norm), group positives
CASES = {
    "dive_temde_triplet": ("dive_temde", "pixels", dict(loss="triplet", warmup_epochs=1, mmd_weight=0.01,
                                                        diversity_weight=0.1)),
    "dive_info_nce_regions": ("dive", "regions", dict(loss="info_nce", num_regions=5, region_dim=12)),
    "vse_triplet_sum": ("vse", "pixels", dict(loss="triplet", reduction="sum", warmup_epochs=0)),
    "temde_info_nce": ("temde", "pixels", dict(loss="info_nce")),
}
GLOBAL_BATCH = 8
STEPS = 3


def _batch(kind, rng):
    import numpy as np

    batch = {"caption_ids": rng.integers(3, 40, (GLOBAL_BATCH, 7)).astype("int32"),
             "caption_mask": np.arange(7)[None, :] < rng.integers(2, 8, (GLOBAL_BATCH, 1)),
             # images 0 and 7 are one image; groups 2 and 5 one group: positives that span both replicas
             "image_id": np.array([0, 1, 2, 3, 4, 5, 6, 0]), "group_id": np.array([0, 1, 2, 3, 4, 2, 6, 0])}
    if kind == "regions":
        batch["regions"] = rng.normal(size=(GLOBAL_BATCH, 5, 12)).astype("float32")
        batch["region_mask"] = np.arange(5)[None, :] < rng.integers(1, 6, (GLOBAL_BATCH, 1))
    else:
        batch["image"] = rng.random((GLOBAL_BATCH, 16, 16, 3)).astype("float32")
    return batch


def mirrored():
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    from tfemde.models import build_dual_encoder

    def trained(name, strategy):
        preset, kind, overrides = CASES[name]
        batch = _batch(kind, np.random.default_rng(0))
        scope = strategy.scope() if strategy is not None else tf.device("/cpu:0")
        with scope:
            keras.utils.set_random_seed(0)
            model = build_dual_encoder(preset, image_input=kind, **{**TINY, **overrides})
            model.compile(optimizer=keras.optimizers.SGD(0.05))
        start = [v.numpy().copy() for v in model.trainable_variables]
        # one step an epoch: the logged loss of each epoch is the loss of that step, before its update
        history = model.fit(tf.data.Dataset.from_tensors(batch), epochs=STEPS, verbose=0).history
        moved = max(float(np.max(np.abs(v.numpy() - s))) for v, s in zip(model.trainable_variables, start))
        return history["loss"], [v.numpy() for v in model.trainable_variables], moved

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    report = {"replicas": strategy.num_replicas_in_sync}
    for name in CASES:
        one_loss, one_weights, moved = trained(name, None)
        two_loss, two_weights, _ = trained(name, strategy)
        report[name] = {"one_device_loss": one_loss, "mirrored_loss": two_loss, "moved": moved,
                        "weight_difference": max(float(np.max(np.abs(a - b))) for a, b in zip(one_weights, two_weights)),
                        "num_variables": len(one_weights)}
    print("REPORT " + json.dumps(report), flush=True)


def worker(out, data, epochs, kill_at=None):
    import keras

    from tfemde.training.runs import train

    class Report(keras.callbacks.Callback):
        first = None

        def on_epoch_begin(self, epoch, logs=None):
            if self.first is None:
                self.first = epoch
                print(f"FIRST_EPOCH {epoch}", flush=True)

        def on_train_batch_end(self, batch, logs=None):
            task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
            if kill_at is not None and task == 1 and batch == 0 and self._epoch == kill_at:
                os._exit(9)

        def on_epoch_end(self, epoch, logs=None):
            self._epoch = epoch + 1

    report = Report()
    report._epoch = 0
    keras_kwargs = dict(embed_dim=16, word_dim=8, num_slots=2, set_depth=1, sketch_depth=2, sketch_bits=2,
                        cnn_filters=(4, 8), image_size=16)
    run = train(data=data, preset="dive_temde", epochs=epochs, batch_size=8, vocab_size=40, out=out, verbose=0,
                strategy="multi_worker", callbacks=[report], **keras_kwargs)
    print("CHIEF" if run is not None else "WORKER", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "mirrored":
        mirrored()
    else:
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else None)
