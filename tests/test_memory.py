"""A SaRA step keeps less memory than a full fine-tuning step (loose bound; exact ratios: bench/)."""

import subprocess
import sys

STEP = r"""
import gc, re, sys, torch
from transformers import AutoModelForSequenceClassification
import sparsedelta as sd
torch.manual_seed(0)
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], num_labels=5)
if sys.argv[2] == "sara":
    sd.prepare(model, sd.SaRAConfig(threshold=1e-3, parameter_kinds=("weight", "embedding"), modules_to_save=["classifier"]))
    params = sd.trainable_parameters(model)
else:
    params = list(model.parameters())
opt = torch.optim.AdamW(params, lr=1e-4)
ids = torch.randint(1000, 20000, (8, 64))
labels = torch.arange(8) % 5
def kib(field):
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1))
gc.collect()
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
    f.write("5")
before = kib("VmRSS")
for _ in range(2):
    model(input_ids=ids, labels=labels).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
print(kib("VmHWM") - before)
"""


def peak_growth_kib(model_path, mode):
    out = subprocess.run(
        [sys.executable, "-c", STEP, str(model_path), mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


def test_sara_step_peak_memory_below_full_fine_tuning(minilm_path):
    full = peak_growth_kib(minilm_path, "full")
    sara = peak_growth_kib(minilm_path, "sara")
    # full fine-tuning adds dense gradients and two Adam moments for all 22.7M entries (~270 MB)
    assert sara < 0.6 * full, f"SaRA grew {sara} KiB, full fine-tuning {full} KiB"
