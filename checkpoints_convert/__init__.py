"""Convert PyTorch UNITER / LXMERT / BERT checkpoints into `value_jax` checkpoint directories.

    python -m checkpoints_convert --src=Epoch20_LXRT.pth --format=lxmert --out=ckpt/lxmert
    model, params = value_jax.load("ckpt/lxmert")

Formats: `uniter` (original `UniterForPretraining` `.pt`), `lxmert` (original
`Epoch20_LXRT.pth`, DataParallel `module.` keys), `hf_lxmert` (HF `LxmertForPreTraining` or
bare `LxmertModel`), `bert` (HF/Google BERT into UNITER's text path; text-only, region
embedding zero-filled). Key tables: `checkpoints_convert.tables`.
"""

from checkpoints_convert.convert import (
    ConversionError,
    ConversionResult,
    Report,
    convert_checkpoint,
    convert_file,
    convert_state_dict,
    infer_config,
    read_state_dict,
)
from checkpoints_convert.files import CheckpointFileError
from checkpoints_convert.tables import FORMATS, LAYOUTS, Rule, Transform

__all__ = [
    "CheckpointFileError",
    "ConversionError",
    "ConversionResult",
    "Report",
    "FORMATS",
    "LAYOUTS",
    "Rule",
    "Transform",
    "convert_checkpoint",
    "convert_file",
    "convert_state_dict",
    "infer_config",
    "read_state_dict",
]
