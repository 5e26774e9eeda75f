"""Every method gives an image the same caption whatever its batch size and position (issue 15):
8 dev images captioned one at a time and in one batch of 8."""

from __future__ import annotations

import pytest

from dleaf_analysis.interventions import get_method
from dleaf_analysis.models import caption


@pytest.mark.parametrize("method", ["greedy", "dleaf", "uniform", "pai", "vcd"])
def test_captions_do_not_depend_on_the_batch(embedded, dev_split, method):
    m = get_method(method)
    images = [dev_split.image(i) for i in range(8)]
    one = caption(embedded, images, batch_size=1, progress=False, decode=m.generate)
    eight = caption(embedded, images, batch_size=8, progress=False, decode=m.generate)
    assert one == eight
