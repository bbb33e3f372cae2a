import os
import platform

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _record_hardware(benchmark):
    benchmark.extra_info.update(processor=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                                torch=torch.__version__, threads=torch.get_num_threads(),
                                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
