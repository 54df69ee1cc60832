"""The networks behind the feature extractors (``eval/extractors.py``): each takes images of values
0..255 at its own input size and returns features, and class logits where it has a classifier.

Interface: ``input_size``, ``channels``, ``num_features``, ``num_classes`` (0: no head),
``features(x)`` and ``head(features)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lightning_gen.config import ConfigError, did_you_mean

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class BareBackbone(nn.Module):
    """Any module mapping float images in [0, 1] to features (``num_features``), at any size: no resizing."""

    input_size = channels = None
    num_classes = 0

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.num_features = net, net.num_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 255)


class DomainBackbone(nn.Module):
    """The domain extractor: a conv net's pooled features and its linear classifier."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.input_size, self.channels = net.image_size, net.body[0].in_channels
        self.num_features, self.num_classes = net.num_features, net.classifier.out_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 255)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.classifier(features)


INCEPTION_LAYERS = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
    "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
    "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool",
)  # fmt: skip


class InceptionBackbone(nn.Module):
    """torch-fidelity's FID InceptionV3 (weights from a file), run from 299 x 299 float input: pool3, and
    logits without the bias (the original Inception Score code multiplies pool3 by the weights only)."""

    input_size, channels, num_features, num_classes = 299, 3, 2048, 1008

    def __init__(self, weights_path: str | Path):
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ModuleNotFoundError as error:
            raise ConfigError(
                f"the inception extractor needs torch-fidelity: pip install torch-fidelity ({error})"
            ) from error
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(weights_path))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 128) / 128
        for name in INCEPTION_LAYERS:
            x = getattr(self.net, name)(x)
        return x.flatten(1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.net.fc.weight.T


class NormalisedBackbone(nn.Module):
    """Base of the backbones fed [0, 1] images normalised by a per-channel mean and std."""

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x / 255 - mean) / std


class DinoV2Backbone(NormalisedBackbone):
    """A DINOv2 ViT at 224 px (16 x 16 patches of 14) on ImageNet-normalised images; no head."""

    input_size, channels, num_classes = 224, 3, 0
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        from lightning_gen.nets.dinov2 import DinoV2, DinoV2Config

        self.net = DinoV2(DinoV2Config.from_state_dict(state))
        self.net.load_state_dict(state)
        self.num_features, self.arch = self.net.num_features, self.net.cfg.arch

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalise(x))


class TimmBackbone(NormalisedBackbone):
    """A timm model: pre-logits features, its classifier as the head when the weights have one."""

    channels = 3

    def __init__(self, name: str, state: dict[str, torch.Tensor]):
        super().__init__()
        import timm

        if not timm.is_model(name):
            raise ConfigError(f"timm has no model {name!r}{did_you_mean(name, timm.list_models())}")
        self.net = timm.create_model(name, pretrained=False).eval()  # BatchNorm statistics frozen from here
        head = {
            f"{self.net.default_cfg.get('classifier', 'head')}.{k}"
            for k in self.net.get_classifier().state_dict()
        }
        if head and head.isdisjoint(state) and set(self.net.state_dict()) - head <= set(state):
            self.net.reset_classifier(0)  # weights saved without the classifier (num_classes=0)
        self.net.load_state_dict(state)
        data = timm.data.resolve_data_config({}, model=self.net)
        self.input_size, self.mean, self.std = data["input_size"][-1], data["mean"], data["std"]
        self.num_classes = self.net.num_classes
        with torch.no_grad():
            self.num_features = self.features(torch.zeros(1, 3, self.input_size, self.input_size)).shape[1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(self.normalise(x)), pre_logits=True)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.get_classifier()(features)


class MethodBackbone(nn.Module):
    """A representation method of this project: ``embed`` with its own preprocessing, at its resolution;
    a supervised checkpoint's classifier as the head."""

    def __init__(self, method: nn.Module):
        super().__init__()
        self.method = method.eval()
        info = method.data_info
        self.input_size, self.channels = info.image_size, info.channels
        classifier = getattr(method, "classifier", None)
        self.num_classes = classifier.out_features if isinstance(classifier, nn.Linear) else 0
        with torch.no_grad():
            self.num_features = self.features(
                torch.zeros(2, self.channels, self.input_size, self.input_size)
            ).shape[1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.embed(self.method.to_float(x / 255, self.method.embed_value_range)).flatten(1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.method.classifier(features)
