"""Interop with Hugging Face PEFT: a delta as a SHiRA adapter, and PEFT adapters as deltas.

    export_shira(delta, base_model, output_dir)          -> ShiraExport
    import_peft(adapter_dir, base_model, output_dir, sparsify=None) -> PeftImport

PEFT itself is imported only where an adapter's ΔW must be computed by PEFT (LoRA and other
non-sparse adapters); SHiRA and Super-Tuning files are read and written directly.
"""

from .from_peft import PeftImport, import_peft
from .to_peft import ShiraExport, export_shira

__all__ = ["PeftImport", "ShiraExport", "export_shira", "import_peft"]
