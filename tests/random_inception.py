"""Random Inception-v3 weights in the real file layout, for tests and benchmarks (no download).

The FID code path is the real one (``InceptionFeatureExtractor`` reads the file as it reads the
released weights); the values mean nothing. ``bench/common.py`` imports this module too.
"""

import io
import os
from pathlib import Path

import torch
from torch import nn


def write_random_inception_weights(path: str | os.PathLike, seed: int = 0, gain: float = 10.0) -> Path:
    """Random Inception-v3 weights (He-normal convs, a gain on the last block so that FIDs are
    O(1..100) as with the real ones), written atomically to ``path``."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Layout(FeatureExtractorInceptionV3):  # torch-fidelity's layers, its weights not loaded
        def load_state_dict(self, *args, **kwargs):
            pass

    empty = io.BytesIO()
    torch.save({}, empty)
    net = Layout("inception-v3-compat", ["2048"], feature_extractor_weights_path=io.BytesIO(empty.getvalue()))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):  # He init keeps activations O(1) through ~50 ReLUs
                module.weight.normal_(0.0, (2.0 / module.weight[0].numel()) ** 0.5, generator=generator)
        for name, block in net.Mixed_7c.named_children():  # relu(g x) = g relu(x): the real features' spread
            if not name.endswith(("_1", "dbl_2")):  # the block's outputs, not its inner convolutions
                block.bn.weight.fill_(gain)
        net.fc.weight.normal_(0.0, 2048**-0.5, generator=generator)  # unused by FID/KID
        net.fc.bias.zero_()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path.with_name(path.name + ".tmp"))
    os.replace(path.with_name(path.name + ".tmp"), path)
    return path
