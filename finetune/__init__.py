"""Fine-tuning GPT-2 on a tokenised dataset (`python run_finetune.py --help`).

- `data`: the .npz dataset as memory-mapped token arrays, cut into n_ctx-token sequences;
- `optimizers`: Adam / Adagrad / SGD with TF1's update rules and slot names;
- `trainer`: the variables and the training step, written for tf.distribute;
- `run_dir`: the run directory (a model directory), its lock and its checkpoints;
- `loop`: the training loop: when to save, validate, sample, stop;
- `memory`: process settings (malloc, oneDNN) made before TensorFlow starts;
- `training_run`: one run from checked flags, putting the parts above together.
"""
