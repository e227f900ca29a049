"""Helpers the benchmark scripts share: waiting for the device, and naming it in a table's header."""
from __future__ import annotations

import platform

import torch


def sync(device: torch.device) -> None:
    "Wait for queued GPU work, so that wall-clock time measures it."
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    elif device.type == 'mps':
        torch.mps.synchronize()


def describe(device: torch.device) -> str:
    "The device in words: GPU name and memory, or CPU model and thread count."
    if device.type == 'cuda':
        p = torch.cuda.get_device_properties(device)
        return f'cuda: {torch.cuda.get_device_name(device)}, {p.total_memory / 2**30:.0f} GiB'
    if device.type == 'mps':
        return f'mps: Apple GPU ({platform.machine()})'
    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    n = torch.get_num_threads()
    return f'cpu: {model}, {n} thread{"s" if n != 1 else ""}'
