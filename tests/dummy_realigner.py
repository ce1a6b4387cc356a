"""A dummy post-fine-tuning defense, as a plugin would add one: this module plus its one registry entry (the
decorator below). It hands the fine-tuned adapter back unchanged, so its variant must score as 'finetuned' does.
tests/test_defense_cells.py imports it and runs it in a cell."""
from pathlib import Path

from nlsr.atomic import write_json
from nlsr.methods import REALIGNERS
from nlsr.modeling import adapter_weights, save_adapter_weights
from nlsr.realign import REPORT_NAME


@REALIGNERS.register("dummy-copy", inputs={"base": "wbase", "finetuned": "finetune"}, settings=())
def copy_adapter(paths: dict, cfg, out: Path, method: str) -> dict:
    save_adapter_weights(paths["finetuned"], adapter_weights(paths["finetuned"]), out)
    report = {"stage": "realign", "method": method, "n_modules": 0, "n_patched": 0, "entries_changed": 0}
    write_json(report, Path(out) / REPORT_NAME)
    return report
