"""absl entry points: `python -m experiments.<analysis> --model=uniter|lxmert`.

Each runs on the built-in demo (a generated checkpoint in the original PyTorch layout, converted,
plus generated data in the real file formats) when no checkpoint / data flags are given.
"""
