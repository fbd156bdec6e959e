"""What a benchmark ran on, for its JSON: timings differ with the CPU model and cache."""

from __future__ import annotations


def cpu_description() -> dict[str, str]:
    """``lscpu``'s model name and L3 size (the figures vary with both), where lscpu exists."""
    import subprocess

    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {
        key: fields[name].strip()
        for key, name in (("model", "Model name"), ("l3", "L3 cache"))
        if name in fields
    }
