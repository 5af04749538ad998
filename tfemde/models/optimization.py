"""The papers' optimisation in Keras: AdamW with per-layer learning-rate scales and per-step cosine decay.

Keras 3 has no parameter groups. DivE trains its set-prediction modules at 0.1x the base learning rate; scaling
their gradients would do nothing under Adam (its update is invariant to gradient scale), so `ScaledAdamW` scales
the *learning rate* of the variables whose path starts with one of `lr_scales`' prefixes, in the Adam step and in
the decoupled weight decay alike (as PyTorch parameter groups do).

On the TensorFlow backend each float32 variable is updated by TensorFlow's fused Adam kernel (`ResourceApplyAdam`,
the same arithmetic as Keras' `Adam.update_step` in one op) and its decay by one `ResourceApplyGradientDescent`,
instead of about fifteen small ops per variable: the optimizer's share of a training step on a 2-core CPU is op
dispatch more than arithmetic (`benchmarks/train_speed.py` times both in its breakdown).
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfemde")
class ScaledAdamW(keras.optimizers.AdamW):
    """AdamW whose learning rate is multiplied per variable by the scale of the first matching path prefix.

    Args:
        lr_scales: dict `{variable path prefix: multiplier}`, e.g. `{"image_set_prediction": 0.1}`. Variables
            matching no prefix use the base learning rate.
        fused: on the TensorFlow backend, update float32 variables with TensorFlow's fused kernels (False: Keras'
            generic `Adam.update_step`; the results agree to float32 rounding).
        **kwargs: passed to `keras.optimizers.AdamW`.

    Example:
        >>> optimizer = ScaledAdamW(learning_rate=1e-3, lr_scales={"text_set_prediction": 0.1})
    """

    def __init__(self, lr_scales=None, fused=True, **kwargs):
        super().__init__(**kwargs)
        self.lr_scales = dict(lr_scales or {})
        self.fused = bool(fused)

    def build(self, var_list):
        super().build(var_list)
        self._scales = [self._scale_of(v) for v in var_list]
        self._decays = [self.weight_decay is not None and self._use_weight_decay(v) for v in var_list]

    def _scale_of(self, variable):
        for prefix, scale in self.lr_scales.items():
            if variable.path.startswith(prefix):
                return float(scale)
        return 1.0

    def _apply_weight_decay(self, variables):
        # Applied per variable inside update_step, where the variable's learning-rate scale is known.
        return

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # What every variable's step shares, computed once per step instead of once per variable.
        self._fused_step = None
        if self.fused and keras.backend.backend() == "tensorflow" and not self.amsgrad:
            step = ops.cast(self.iterations + 1, "float32")
            beta_1, beta_2 = ops.cast(self.beta_1, "float32"), ops.cast(self.beta_2, "float32")
            self._fused_step = {
                "beta_1": beta_1, "beta_2": beta_2, "epsilon": ops.cast(self.epsilon, "float32"),
                "beta_1_power": ops.power(beta_1, step), "beta_2_power": ops.power(beta_2, step),
                "learning_rate": ops.cast(learning_rate, "float32"),
                "decay_rate": ops.cast(learning_rate, "float32") * ops.cast(self.weight_decay or 0.0, "float32"),
            }
        super()._backend_update_step(grads, trainable_variables, learning_rate)

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        if getattr(self, "_fused_step", None) is not None and variable.dtype == "float32":
            return self._fused_update_step(gradient, variable, index)
        learning_rate = ops.multiply(ops.cast(learning_rate, variable.dtype), self._scales[index])
        if self._decays[index]:
            variable.assign(variable - variable * ops.cast(self.weight_decay, variable.dtype) * learning_rate)
        super().update_step(gradient, variable, learning_rate)

    def _fused_update_step(self, gradient, variable, index):
        import tensorflow as tf

        shared, scale = self._fused_step, self._scales[index]
        learning_rate, decay_rate = shared["learning_rate"], shared["decay_rate"]
        if scale != 1.0:
            learning_rate, decay_rate = learning_rate * scale, decay_rate * scale
        if isinstance(variable, keras.Variable):
            variable = variable.value  # the tf.Variable
        if self._decays[index]:  # w <- w - lr * wd * w, before the Adam step (as AdamW)
            tf.raw_ops.ResourceApplyGradientDescent(var=variable.handle, alpha=decay_rate,
                                                    delta=tf.convert_to_tensor(variable))
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].value.handle, v=self._velocities[index].value.handle,
            beta1_power=shared["beta_1_power"], beta2_power=shared["beta_2_power"], lr=learning_rate,
            beta1=shared["beta_1"], beta2=shared["beta_2"], epsilon=shared["epsilon"],
            grad=tf.convert_to_tensor(ops.cast(gradient, "float32")))

    def get_config(self):
        return {**super().get_config(), "lr_scales": dict(self.lr_scales), "fused": self.fused}


@keras.saving.register_keras_serializable(package="tfemde")
class CosineDecayPerStep(keras.optimizers.schedules.LearningRateSchedule):
    """Cosine annealing from `initial_learning_rate` to 0, stepped per iteration over `decay_steps` steps.

    `decay_steps` is a variable so that `DualEncoder.fit` can set it from the epochs and the steps per epoch it
    is about to run (DivE anneals over all iterations of the run).
    """

    def __init__(self, initial_learning_rate, decay_steps=1, alpha=0.0):
        self.initial_learning_rate = float(initial_learning_rate)
        self.alpha = float(alpha)
        self.decay_steps = keras.Variable(float(decay_steps), trainable=False, name="decay_steps", dtype="float32")

    def __call__(self, step):
        progress = ops.minimum(ops.cast(step, "float32") / ops.maximum(self.decay_steps, 1.0), 1.0)
        cosine = 0.5 * (1.0 + ops.cos(3.141592653589793 * progress))
        return self.initial_learning_rate * ((1.0 - self.alpha) * cosine + self.alpha)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate,
                "decay_steps": float(ops.convert_to_numpy(self.decay_steps)), "alpha": self.alpha}


def make_optimizer(config):
    """The default optimizer of a config: ScaledAdamW + per-step cosine decay + global-norm clipping.

    The set-prediction modules (layers named `image_set_prediction` / `text_set_prediction`) train at
    `config.resolved_set_lr_scale` times the base learning rate.
    """
    scale = config.resolved_set_lr_scale
    return ScaledAdamW(
        learning_rate=CosineDecayPerStep(config.learning_rate),
        weight_decay=config.weight_decay,
        global_clipnorm=config.clipnorm or None,
        lr_scales={"image_set_prediction": scale, "text_set_prediction": scale} if scale != 1.0 else {},
    )
