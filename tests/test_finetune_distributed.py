"""Fine-tuning with tf.distribute on this CPU: two logical devices mirrored, and two workers
on loopback. Both run in child processes (devices and clusters are fixed at TF start-up)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from model_dir import load_model_dir, read_tensors

# Each test starts TensorFlow in two child processes.
pytestmark = pytest.mark.slow


def test_mirrored_on_two_devices_equals_one_device(tiny_model_dir, tiny_dataset):
    result = subprocess.run([sys.executable, 'tests/distributed_run.py', str(tiny_model_dir),
                             str(tiny_dataset), '3'], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report['replicas'] == 2
    np.testing.assert_allclose(report['mirrored_losses'], report['single_losses'], rtol=1e-5)
    assert report['max_weight_change'] > 1e-4  # it trained...
    assert report['max_weight_difference'] < 1e-5  # ...the same way
    np.testing.assert_allclose(report['accumulated_losses'], report['single_losses'], rtol=1e-5)
    assert report['max_accumulated_difference'] < 1e-5


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(('127.0.0.1', 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_two_workers_on_loopback_finish_with_one_chief_checkpoint(tmp_path, tiny_model_dir, tiny_dataset):
    workers = [f'127.0.0.1:{port}' for port in free_ports(2)]
    processes = []
    for index in range(2):
        tf_config = {'cluster': {'worker': workers}, 'task': {'type': 'worker', 'index': index}}
        processes.append(subprocess.Popen(
            [sys.executable, 'run_finetune.py', '--strategy', 'multiworker', '--dataset', str(tiny_dataset),
             '--base_model', str(tiny_model_dir), '--checkpoint_dir', str(tmp_path),
             '--batch_size', '2', '--max_steps', '3', '--save_every', '0', '--no-xla',
             '--learning_rate', '1e-3'],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, TF_CONFIG=json.dumps(tf_config))))
    try:
        outputs = [p.communicate(timeout=90) for p in processes]
    finally:
        for p in processes:
            p.kill()
    for p, (_, err) in zip(processes, outputs):
        assert p.returncode == 0, err
    chief_err, worker_err = outputs[0][1], outputs[1][1]
    assert chief_err.count('Saving ') == 1 and 'Saving' not in worker_err
    run_dir = tmp_path / 'gpt2ja_finetune'
    assert [p.name for p in run_dir.glob('*.index')] == ['model-3.index']
    assert read_tensors(load_model_dir(run_dir).checkpoint, ['global_step'])['global_step'] == 3
