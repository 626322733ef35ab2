"""Adam, Adagrad and SGD with the update rules, defaults and checkpoint names of TF1's
`tf.compat.v1.train` optimizers, so that our checkpoints carry the original's optimizer
state (`model/wte/Adam`, `model/wte/Adam_1`, `beta1_power`, `beta2_power`) and resume from it.

Each optimizer is a description of its state plus an update: `initial_state(shapes)` gives
the state's checkpoint names and initial values; `apply(variable, grad, slots, scalars, lr)`
(optionally with `constants=`, the tensors of `constants()` made once for many variables)
updates one variable and its slots in place with TF's fused training kernels (the very ops
TF1's optimizers run: one pass over memory, no temporaries), so the trainer can run it on
each device's copy of a variable (tf.distribute's `extended.update`).
"""
import tensorflow as tf


def _filled(shape, value):
    """A function making a float32 tensor of `shape` holding `value`, built by TensorFlow in
    its own memory (a numpy array would be filled, then copied)."""
    if value == 0:
        return lambda: tf.zeros(shape, tf.float32)
    return lambda: tf.fill(shape, tf.constant(value, tf.float32))


class SGD:
    """TF1 GradientDescentOptimizer: value -= lr * grad."""
    name = 'sgd'
    slot_suffixes = ()

    def initial_state(self, shapes):
        """Checkpoint name -> function making the initial value (a tensor) of every slot and
        shared scalar (functions, so that no slot is in memory before its variable)."""
        return {}

    # Shared scalar -> the factor it is multiplied by each applied step (the beta powers).
    scalar_factors = {}

    def constants(self):
        """Its hyperparameters as tensors, to share between the updates of many variables."""
        return {}

    def apply(self, variable, grad, slots, scalars, lr, *, constants=None):
        return tf.raw_ops.ResourceApplyGradientDescent(var=variable.handle, alpha=lr, delta=grad)


class Adagrad:
    """TF1 AdagradOptimizer: accumulator starts at 0.1; acc += grad^2;
    value -= lr * grad / sqrt(acc)."""
    name = 'adagrad'
    slot_suffixes = ('Adagrad',)

    def __init__(self, initial_accumulator_value=0.1):
        self.initial_accumulator_value = initial_accumulator_value

    def initial_state(self, shapes):
        return {f'{name}/Adagrad': _filled(shape, self.initial_accumulator_value)
                for name, shape in shapes.items()}

    scalar_factors = {}

    def constants(self):
        return {}

    def apply(self, variable, grad, slots, scalars, lr, *, constants=None):
        return tf.raw_ops.ResourceApplyAdagrad(var=variable.handle, accum=slots[0].handle, lr=lr,
                                               grad=grad)


class Adam:
    """TF1 AdamOptimizer, with the original run_finetune.py's betas and epsilon:
    m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    value -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps),
    where b1^t, b2^t are the `beta1_power`, `beta2_power` variables (b1, b2 before step 1)."""
    name = 'adam'
    slot_suffixes = ('Adam', 'Adam_1')

    def __init__(self, beta1=0.9, beta2=0.98, epsilon=1e-7):
        self.beta1, self.beta2, self.epsilon = beta1, beta2, epsilon

    def initial_state(self, shapes):
        state = {'beta1_power': _filled((), self.beta1), 'beta2_power': _filled((), self.beta2)}
        for name, shape in shapes.items():
            state[f'{name}/Adam'] = _filled(shape, 0.0)
            state[f'{name}/Adam_1'] = _filled(shape, 0.0)
        return state

    @property
    def scalar_factors(self):
        return {'beta1_power': self.beta1, 'beta2_power': self.beta2}

    def constants(self):
        return {name: tf.constant(value, tf.float32)
                for name, value in (('beta1', self.beta1), ('beta2', self.beta2), ('epsilon', self.epsilon))}

    def apply(self, variable, grad, slots, scalars, lr, *, constants=None):
        m, v = slots
        constants = constants or self.constants()
        return tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=m.handle, v=v.handle, beta1_power=scalars['beta1_power'],
            beta2_power=scalars['beta2_power'], lr=lr, beta1=constants['beta1'],
            beta2=constants['beta2'], epsilon=constants['epsilon'], grad=grad)


OPTIMIZERS = {'adam': Adam, 'adagrad': Adagrad, 'sgd': SGD}


def make_optimizer(name):
    return OPTIMIZERS[name]()


def warmup_learning_rate(step, *, learning_rate, warmup_steps):
    """The learning rate of 0-based `step`: rising linearly from 1e-10 to `learning_rate` over
    the first `warmup_steps` steps (TF1 polynomial_decay, as the original meant to), then flat."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return learning_rate
    return 1e-10 + (learning_rate - 1e-10) * step / warmup_steps
