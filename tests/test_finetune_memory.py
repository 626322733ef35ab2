"""finetune/memory.py: the process settings run_finetune.py makes before TensorFlow starts."""
import os
import sys


def test_process_memory_settings(monkeypatch):
    # glibc malloc is tuned always; oneDNN is on, except with --recompute, unless the
    # environment already says otherwise.
    from finetune import memory
    if sys.platform.startswith('linux'):
        assert memory.tune_malloc()
    monkeypatch.delenv('TF_ENABLE_ONEDNN_OPTS', raising=False)
    memory.prepare_process(recompute=False)
    assert os.environ['TF_ENABLE_ONEDNN_OPTS'] == '1'
    monkeypatch.delenv('TF_ENABLE_ONEDNN_OPTS')
    memory.prepare_process(recompute=True)
    assert os.environ['TF_ENABLE_ONEDNN_OPTS'] == '0'
    monkeypatch.setenv('TF_ENABLE_ONEDNN_OPTS', '1')
    memory.prepare_process(recompute=True)
    assert os.environ['TF_ENABLE_ONEDNN_OPTS'] == '1'
