"""``sinkscope flow --variant V`` writes ``tokens_fed.parquet`` as ``sinkscope eval`` does (issue 25,
point 7): which ViT tokens each variant fed the LLM, and in what order.

Known answers on tiny-llava with planted sinks (a CLS + 4 x 4 layout): one 32 x 32 image with
three marked cells (0, 0), (2, 3), (3, 1) - ViT tokens 1, 12 and 14 - under ``norm:100``:
``sinks-front`` feeds 1, 12, 14 and then the other 13 patches in ViT order; one marked cell (1, 2),
token 7, under the default rule (the automatic gap): 7 first.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sinkscope import load_run, paint_markers
from sinkscope.cli import main
from sinkscope.data import ImageItem
from sinkscope.evaluation.items import VQAItem
from sinkscope.evaluation.run import evaluate

COLUMNS = ["id", "variant", "image", "vit_token", "row", "col", "norm", "is_vit_sink", "llm_position", "position_id"]




def _in_order(df: pd.DataFrame) -> pd.DataFrame:
    """The fed rows in the order the LLM reads them, positions counted from the first visual token."""
    fed = df.dropna(subset=["llm_position"]).sort_values("llm_position").reset_index(drop=True)
    first = fed.llm_position.min()
    return fed.assign(llm_position=fed.llm_position - first, position_id=fed.position_id - fed.position_id.min())


@pytest.mark.parametrize(("rule", "cells", "sinks"), [("norm:100", [(0, 0), (2, 3), (3, 1)], [1, 12, 14]), (None, [(1, 2)], [7])])
def test_flow_variant_writes_the_tokens_eval_feeds(tmp_path, rule, cells, sinks):
    img = tmp_path / "cells.png"
    Image.fromarray(paint_markers(np.full((32, 32, 3), 150, np.uint8), cells)).save(img)
    flag = ["--sink-rule", rule] if rule else []
    out = tmp_path / "flow"
    assert main(["flow", "--model", "tiny-llava+sinks", "--images", str(img), "--analysis", "rollout",
                 "--variant", "sinks-front", *flag, "--out", str(out), "-q"]) == 0  # fmt: skip
    flow = pd.read_parquet(out / "tokens_fed.parquet")
    assert list(flow.columns) == COLUMNS and set(flow.variant) == {"both", "sinks-front"}
    assert load_run(out).tables["tokens_fed"].equals(flow)  # read back with the run

    item = VQAItem("cells", ImageItem("cells", str(img)), "what is this ?", "yes", "global", task="t", choices=("yes", "no"))
    ev = evaluate("tiny-llava+sinks", [item], variants=("sinks-front",), sink_rule=rule, out=tmp_path / "eval", progress=False)
    eva = pd.read_parquet(ev.out / "tokens_fed.parquet")
    assert list(eva.columns) == list(flow.columns)

    f, e = _in_order(flow[flow.variant == "sinks-front"]), _in_order(eva)
    want = sinks + [t for t in range(1, 17) if t not in sinks]
    assert f.vit_token.tolist() == want and e.vit_token.tolist() == want
    cols = ["variant", "image", "vit_token", "row", "col", "is_vit_sink", "llm_position", "position_id"]
    pd.testing.assert_frame_equal(f[cols], e[cols])
    np.testing.assert_allclose(f.norm, e.norm, rtol=1e-5)
    assert f[f.is_vit_sink].vit_token.tolist() == sinks and (f.id == "cells.png").all() and (e.id == "cells").all()  # ids: the image, the item
    both = _in_order(flow[flow.variant == "both"])
    assert both.vit_token.tolist() == list(range(1, 17))  # the reference feeds the ViT order
