"""finetune/memory.py: the process settings run_finetune.py makes before TensorFlow starts."""
import os
import sys


def test_process_memory_settings(monkeypatch):
    # glibc malloc is tuned always; --recompute turns oneDNN off unless the environment
    # already says otherwise.
    from finetune import memory
    if sys.platform.startswith('linux'):
        assert memory.tune_malloc()
    monkeypatch.delenv('TF_ENABLE_ONEDNN_OPTS', raising=False)
    memory.prepare_process(recompute=False)
    assert 'TF_ENABLE_ONEDNN_OPTS' not in os.environ
    memory.prepare_process(recompute=True)
    assert os.environ['TF_ENABLE_ONEDNN_OPTS'] == '0'
    monkeypatch.setenv('TF_ENABLE_ONEDNN_OPTS', '1')
    memory.prepare_process(recompute=True)
    assert os.environ['TF_ENABLE_ONEDNN_OPTS'] == '1'
