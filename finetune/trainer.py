"""The training state (network, optimizer slots, step) as variables, and one training step.

Written for tf.distribute from the start; on one device the default strategy runs the same
code. Every variable is created under `strategy.scope()`, so a MirroredStrategy or
MultiWorkerMirroredStrategy keeps a copy on every replica. One step:
  1. each replica computes the summed token loss and its gradients over its share of the
     global batch (K micro-batches for gradient accumulation, summed, so only one
     micro-batch of activations is alive at a time);
  2. the replica context all-reduces (sums) loss and gradients; dividing by the number of
     real target tokens in the whole global batch makes them the large batch's mean;
  3. if the loss and every gradient are finite (their sum is), the optimizer updates every
     copy of every variable (`extended.update`, as TF's own optimizers do); else nothing
     changes and the step reports it.
Steps 1-2 and step 3 are two traced functions, and the host decides between them (it reads
the loss every step anyway). One function holding the update under a `tf.cond` made the
condition capture every variable, slot and gradient (~600 inputs): 0.4 s more tracing
before the first step at gpt2ja-small, and a larger graph to optimise, for no gain at run
time (the update has to wait for every gradient either way, to know whether they are
finite). A second Ctrl-C between the two (finetune.loop.StopRequest) leaves the state as it
was before the step.
The variables carry checkpoint names (`model/...`, `model/wte/Adam`, `beta1_power`,
`global_step`), so `tensors()` is what a TF1-layout checkpoint holds.
"""
import numpy as np
import tensorflow as tf

import model
from finetune.run_dir import STEP_VARIABLE
from model_dir import Filling, empty_variable

COMPUTE_DTYPES = {'float32': tf.float32, 'bfloat16': tf.bfloat16, 'float16': tf.float16}


def token_loss_sum(values, tokens, weights, *, hparams, compute_dtype, recompute):
    """Sum over the batch of the weighted next-token cross-entropy (float32).

    values: parameter name -> float32 tensor; tokens int32 [batch, n_ctx];
    weights float32 [batch, n_ctx - 1] (0 where the target is padding).
    """
    if compute_dtype != tf.float32:
        values = {name: tf.cast(value, compute_dtype) for name, value in values.items()}
    hidden = model.training_hidden(values, tokens, hparams=hparams, recompute=recompute)
    # Every position is scored, [batch * n_ctx, n_embd]; the last has no next token, so its
    # target is a placeholder of weight 0. (Slicing it off instead would cost the gradient
    # of the slice: a padded copy of the hidden states.)
    flat = tf.reshape(hidden, [-1, hparams.n_embd])
    logits = tf.matmul(flat, values[f'{model.SCOPE}/wte'], transpose_b=True)
    targets = tf.concat([tokens[:, 1:], tokens[:, :1]], axis=1)
    weights = tf.pad(weights, [[0, 0], [0, 1]])
    # The cross-entropy (log-softmax) in float32 whatever the compute format.
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.reshape(targets, [-1]), logits=tf.cast(logits, tf.float32))
    return tf.reduce_sum(losses * tf.reshape(weights, [-1]))


def state_specs(hparams, optimizer):
    """Checkpoint name -> (shape, dtype) of every variable of the training state."""
    shapes = model.parameter_shapes(hparams)
    specs = {name: (shape, tf.float32) for name, shape in shapes.items()}
    specs.update({f'{name}/{suffix}': (shape, tf.float32)
                  for name, shape in shapes.items() for suffix in optimizer.slot_suffixes})
    specs.update({name: ((), tf.float32) for name in optimizer.scalar_factors})
    specs[STEP_VARIABLE] = ((), tf.int64)
    return specs


class Trainer:
    """Variables and compiled step for one run. `initial`: checkpoint name -> zero-argument
    function giving the initial value (read lazily, to keep peak memory low).

    On one device the variables are created empty and filled by a background thread
    (`model_dir.Filling`), so that `trace_step` can trace the step meanwhile; every method
    that reads them waits for the filling first. Across devices they are created from their
    values, as tf.distribute wants (a multi-worker run gives every worker the chief's)."""

    def __init__(self, *, hparams, optimizer, initial, strategy=None, precision='float32',
                 recompute=False, xla=False):
        self.hparams = hparams
        self.optimizer = optimizer
        self.strategy = strategy or tf.distribute.get_strategy()
        self.compute_dtype = COMPUTE_DTYPES[precision]
        self.recompute = recompute
        self.xla = xla
        self.loss_scaling = precision == 'float16'
        self.param_names = list(model.parameter_shapes(hparams))
        self._filling = None
        # The default strategy (no scope entered anywhere): one device, plain variables.
        one_device = not tf.distribute.has_strategy() and self.strategy is tf.distribute.get_strategy()
        with self.strategy.scope():
            if one_device:
                specs = state_specs(hparams, optimizer)
                self._filling = Filling({
                    name: (empty_variable(*specs[name], name=name.replace('/', '.')), make_value)
                    for name, make_value in initial.items()})
                self.variables = self._filling.variables
            else:
                self.variables = {name: tf.Variable(make_value(), name=name.replace('/', '.'),
                                                    trainable=False)
                                  for name, make_value in initial.items()}
        self.params = [self.variables[name] for name in self.param_names]
        self.slots = [[self.variables[f'{name}/{suffix}'] for suffix in optimizer.slot_suffixes]
                      for name in self.param_names]
        self.scalars = {name: self.variables[name] for name in optimizer.scalar_factors}
        self._gradient_sums = None  # see _accumulated_gradients
        # Plain Python control flow only (loops over static counts, explicit tf.cond), so
        # traced without autograph's rewriting, which is most of the tracing time.
        self._gradients = tf.function(self._micro_batch_gradients, jit_compile=xla, autograph=False)
        self._loss_sum = tf.function(self._micro_batch_loss, jit_compile=xla, autograph=False)
        self._step_gradients = tf.function(self._distributed_gradients, autograph=False)
        self._update = tf.function(self._distributed_update, autograph=False)
        self._count_step = tf.function(self._distributed_count, autograph=False)
        self._evaluate = tf.function(self._distributed_loss, autograph=False)

    @property
    def num_replicas(self):
        return self.strategy.num_replicas_in_sync

    def _filled(self):
        """Wait until the variables hold their initial values (raises what reading them raised)."""
        if self._filling is not None:
            self._filling.wait()
            self._filling = None

    def trace_step(self, *, accumulate, batch_size):
        """Trace the training step for `accumulate` micro-batches of `batch_size` sequences now,
        while the variables are being filled, rather than on the first `train_step`."""
        if self._filling is None:
            return  # nothing to overlap with
        if accumulate > 1 and self._gradient_sums is None:
            self._make_gradient_sums()
        n_ctx, scalar = self.hparams.n_ctx, tf.TensorSpec([], tf.float32)
        self._step_gradients.get_concrete_function(
            tf.TensorSpec([accumulate, batch_size, n_ctx], tf.int32),
            tf.TensorSpec([accumulate, batch_size, n_ctx - 1], tf.float32), scalar, scalar)
        self._update.get_concrete_function([tf.TensorSpec(p.shape, p.dtype) for p in self.params], scalar)
        self._count_step.get_concrete_function()

    def step_number(self):
        self._filled()
        return int(self.variables[STEP_VARIABLE].numpy())

    def tensors(self):
        """Checkpoint name -> this worker's copy of each variable (for saving; no copies)."""
        self._filled()
        return {name: self.strategy.experimental_local_results(variable)[0]
                for name, variable in self.variables.items()}

    def parameter_values(self):
        """Parameter name -> this worker's copy of its variable (the float32 master weights)."""
        tensors = self.tensors()
        return {name: tensors[name] for name in self.param_names}

    # -- inside one replica ------------------------------------------------------------
    def _micro_batch_loss(self, values, tokens, weights):
        return token_loss_sum(dict(zip(self.param_names, values)), tokens, weights,
                              hparams=self.hparams, compute_dtype=self.compute_dtype,
                              recompute=self.recompute)

    def _micro_batch_gradients(self, values, tokens, weights, total_weight, loss_scale):
        """(summed loss, gradients of summed loss / total_weight) of one micro-batch: its
        share of the global batch's mean gradient. A pure function of tensors, so that it can
        be XLA-compiled and run on any replica. The gradients come out of the tape already
        normalised (and unscaled only where float16 needs a loss scale): each further
        division would hold another copy of every gradient in memory."""
        with tf.GradientTape() as tape:
            tape.watch(values)
            loss_sum = self._micro_batch_loss(values, tokens, weights)
            objective = loss_sum * (loss_scale / total_weight)
        grads = [tf.convert_to_tensor(g) for g in tape.gradient(objective, values)]
        if self.loss_scaling:
            grads = [g / loss_scale for g in grads]
        return loss_sum, grads

    def _accumulated_gradients(self, tokens, weights, total_weight, loss_scale):
        """tokens [K, batch, n_ctx]: the K micro-batches' summed loss and gradients.

        With K > 1 the running sum lives in variables (`_gradient_sums`): each micro-batch's
        gradients are added in place and released as they come, so what is alive beyond
        one step of K = 1 is the sum itself, one copy of every gradient. Summed as tensors
        (a + b), the first micro-batch's gradients, the next one's and their sum were alive
        together, and the freed activations fragmented the heap: measured +1.1 GB at K=2.
        """
        values = [tf.convert_to_tensor(p) for p in self.params]
        if tokens.shape[0] == 1:
            # Traced into the step's own graph, not as a function of its own (unless XLA
            # compiles it): one graph less to keep.
            gradients = self._gradients if self.xla else self._micro_batch_gradients
            return gradients(values, tokens[0], weights[0], total_weight, loss_scale)
        loss_sum, added = 0.0, []
        for k in range(tokens.shape[0]):
            # One micro-batch after the other: run side by side, their activations would
            # all be alive at once, which is what accumulation is meant to avoid.
            with tf.control_dependencies(added):
                more_loss, grads = self._gradients(values, tokens[k], weights[k],
                                                   total_weight, loss_scale)
            loss_sum += more_loss
            added = [(total.assign if k == 0 else total.assign_add)(g, read_value=False)
                     for total, g in zip(self._gradient_sums, grads)]
        with tf.control_dependencies(added):
            return loss_sum, [total.read_value() for total in self._gradient_sums]

    def _make_gradient_sums(self):
        """One variable a parameter for accumulation, local to each replica (ON_READ): not
        part of the checkpoint, created on the first step with K > 1."""
        with self.strategy.scope():
            self._gradient_sums = [
                tf.Variable(tf.zeros(p.shape, p.dtype), trainable=False, name='gradient_sum',
                            synchronization=tf.VariableSynchronization.ON_READ,
                            aggregation=tf.VariableAggregation.SUM)
                for p in self.params]

    def _replica_gradients(self, tokens, weights, total_weight, loss_scale):
        loss_sum, grads = self._accumulated_gradients(tokens, weights, total_weight, loss_scale)
        context = tf.distribute.get_replica_context()
        loss_sum, grads = context.all_reduce(tf.distribute.ReduceOp.SUM, (loss_sum, grads))
        loss = loss_sum / total_weight
        # A sum is finite exactly when its terms are (inf and NaN propagate), unless it
        # overflows, which takes gradients near float32's limit: a step to skip as well.
        # One summing pass over each gradient, where is_finite would write a mask of it.
        finite = tf.math.is_finite(loss + tf.add_n([tf.reduce_sum(g) for g in grads]))
        return loss, finite, grads

    # -- across replicas ---------------------------------------------------------------
    def _distributed_gradients(self, tokens, weights, total_weight, loss_scale):
        """(mean token loss, whether it and every gradient are finite, the all-reduced
        gradients: one value a replica, each replica's copy the same)."""
        loss, finite, grads = self.strategy.run(self._replica_gradients, args=(
            tokens, weights, total_weight, loss_scale))
        local = self.strategy.experimental_local_results
        return local(loss)[0], local(finite)[0], grads

    def _distributed_update(self, grads, learning_rate):
        """Update every copy of every variable with its all-reduced gradient, and count the
        step. `extended.update` runs the update on each device's copy with that device's
        gradient. What every variable's update shares (the beta powers, read once: every copy
        holds the same value; the optimizer's constants) is made once, not once a variable:
        ~5 ops of each variable's 6, and tracing an op is what the update's share of the
        first step costs."""
        with self.strategy.scope():
            extended = self.strategy.extended

            def apply_one(variable, grad, learning_rate, scalars, constants, *slots):
                return self.optimizer.apply(variable, grad, slots, scalars, learning_rate, constants=constants)

            scalars = {name: tf.convert_to_tensor(v) for name, v in self.scalars.items()}
            constants = self.optimizer.constants()
            updates = [extended.update(variable, apply_one, group=False,
                                       args=(grad, learning_rate, scalars, constants, *slots))
                       for variable, grad, slots in zip(self.params, grads, self.slots)]
            # The beta powers advance only after every variable has read them.
            with tf.control_dependencies(tf.nest.flatten(updates)):
                for name, factor in self.optimizer.scalar_factors.items():
                    extended.update(self.scalars[name], lambda v, factor=factor: v.assign(v * factor))
            self._distributed_count()

    def _distributed_count(self):
        """Count a step (applied or passed over) on every copy of the step variable."""
        with self.strategy.scope():
            self.strategy.extended.update(self.variables[STEP_VARIABLE], lambda v: v.assign_add(1))

    def _replica_loss(self, tokens, weights):
        values = [tf.convert_to_tensor(p) for p in self.params]
        loss_sum = self._loss_sum(values, tokens, weights)
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, loss_sum)

    def _distributed_loss(self, tokens, weights):
        return self.strategy.experimental_local_results(
            self.strategy.run(self._replica_loss, args=(tokens, weights)))[0]

    # -- called from the host ----------------------------------------------------------
    def _split(self, array, axis):
        """A global-batch numpy array as per-replica tensors: equal parts along `axis`."""
        parts = np.split(array, self.num_replicas, axis=axis)
        return self.strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(parts[context.replica_id_in_sync_group]))

    def train_step(self, tokens, weights, *, learning_rate, loss_scale=1.0):
        """One optimizer step on the global batch: tokens int32 [K, batch, n_ctx] (K
        micro-batches accumulated), weights float32 [K, batch, n_ctx - 1]; batch divisible by
        the number of replicas. Returns (mean token loss, whether the update was applied)."""
        self._filled()
        if tokens.shape[0] > 1 and self._gradient_sums is None:
            self._make_gradient_sums()
        loss, finite, grads = self._step_gradients(self._split(tokens, 1), self._split(weights, 1),
                                                   tf.constant(max(float(weights.sum()), 1.0)),
                                                   tf.constant(loss_scale, tf.float32))
        applied = bool(finite.numpy())
        if applied:
            self._update(grads, tf.constant(learning_rate, tf.float32))
        else:
            self._count_step()
        return float(loss.numpy()), applied

    def loss_sum(self, tokens, weights):
        """Summed token loss over tokens int32 [batch, n_ctx] (no update)."""
        self._filled()
        return float(self._evaluate(self._split(tokens, 0), self._split(weights, 0)).numpy())
