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


def cpu_model() -> str:
    "The CPU model, from /proc/cpuinfo where there is one."
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(device: torch.device | None = None) -> dict:
    "The machine a benchmark ran on: CPU model, cores, threads, load, torch version, device, date (UTC)."
    import datetime
    import os
    out = {'cpu': cpu_model(), 'cores': os.cpu_count(), 'threads': torch.get_num_threads(),
           'torch': torch.__version__, 'python': platform.python_version(),
           'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}
    try:
        out['load_average'] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device is not None:
        out['device'] = describe(device)
    return out


def write_json(path, tables: dict, device: torch.device | None = None, **settings) -> None:
    "Write `tables` (name -> list of row dicts), the settings and the machine description to `path` as JSON."
    import json
    from pathlib import Path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {'machine': machine(device), 'settings': settings, 'tables': tables}
    path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')
    print(f'# wrote {path}')
