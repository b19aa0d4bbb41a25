"""Segmentation metrics and inference (beit.train.segment.inference) on small tensors, on the CPU."""

import math

import pytest
import torch
from torch import nn

from beit.train.segment.inference import (
    confusion,
    predict,
    predict_logits,
    segmentation_metrics,
    slide_logits,
    whole_logits,
)

CLASSES = 4


def conv_model(kernel: int, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(3, CLASSES, kernel, padding=kernel // 2).eval()


class GlobalContext(nn.Module):
    """Each pixel's logits depend on the whole input (its mean colour), as attention makes them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.pixel, self.context = nn.Conv2d(3, CLASSES, 1), nn.Conv2d(3, CLASSES, 1)

    def forward(self, x):
        return self.pixel(x) + self.context(x.mean((2, 3), keepdim=True))


class FixedSize(nn.Module):
    """Accepts only crop-sized inputs, like a ViT whose relative position tables fit the crop's grid."""

    def __init__(self, model, size):
        super().__init__()
        self.model, self.size = model, size

    def forward(self, x):
        assert tuple(x.shape[2:]) == self.size, f"input {tuple(x.shape[2:])}, model takes {self.size}"
        return self.model(x)


def image(height=10, width=13, batch=2, seed=2):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_metrics_equal_a_hand_computed_confusion_matrix():
    # class 3: in neither ground truth nor prediction (the ignored pixel's "3" must not count);
    # class 2: predicted once, absent from the ground truth.
    label = torch.tensor([[0, 0, 1, 255], [1, 1, 0, 0]])
    pred = torch.tensor([[0, 1, 1, 3], [1, 2, 0, 0]])
    matrix = confusion(pred, label, CLASSES)
    assert matrix.dtype == torch.int64
    assert matrix.tolist() == [[3, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]

    metrics = segmentation_metrics(matrix, ["a", "b", "c", "d"])
    ious = [row["iou"] for row in metrics["per_class"]]
    accs = [row["acc"] for row in metrics["per_class"]]
    assert ious[:3] == pytest.approx([3 / 4, 2 / 4, 0.0]) and math.isnan(ious[3])
    assert accs[:2] == pytest.approx([3 / 4, 2 / 3]) and math.isnan(accs[2]) and math.isnan(accs[3])
    assert metrics["mIoU"] == pytest.approx((3 / 4 + 2 / 4 + 0) / 3)  # class 2 counts as 0, class 3 not at all
    assert metrics["mAcc"] == pytest.approx((3 / 4 + 2 / 3) / 2)  # classes 2 and 3 left out
    assert metrics["aAcc"] == pytest.approx(5 / 7)  # 7 labelled pixels, the ignored one not among them
    assert [row["name"] for row in metrics["per_class"]] == ["a", "b", "c", "d"]


def test_confusion_accumulates_over_a_data_set():
    labels = torch.randint(0, CLASSES, (3, 6, 7), generator=torch.Generator().manual_seed(0))
    labels[:, 0, :] = 255
    preds = torch.randint(0, CLASSES, (3, 6, 7), generator=torch.Generator().manual_seed(1))
    total = torch.zeros(CLASSES, CLASSES, dtype=torch.int64)
    for pred, label in zip(preds, labels, strict=True):
        total += confusion(pred, label, CLASSES)
    assert torch.equal(total, confusion(preds, labels, CLASSES))
    assert int(total.sum()) == 3 * 5 * 7


def test_a_label_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"label values \[7\] are outside 0..3"):
        confusion(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 7], [1, 255]]), CLASSES)


@pytest.mark.parametrize("model", [conv_model(1), GlobalContext(), conv_model(3)], ids=["1x1", "global", "3x3"])
def test_one_window_covering_the_image_equals_whole_inference(model):
    pixels = image()
    torch.testing.assert_close(slide_logits(model, pixels, CLASSES, (10, 13), 5), whole_logits(model, pixels, CLASSES))


@pytest.mark.parametrize(("crop", "stride"), [(4, 3), ((5, 6), (2, 4)), (4, 4), ((10, 5), (7, 3))])
def test_overlapping_windows_average_to_whole_inference_for_a_per_pixel_model(crop, stride):
    model = conv_model(1)
    pixels = image()
    torch.testing.assert_close(slide_logits(model, pixels, CLASSES, crop, stride), whole_logits(model, pixels, CLASSES))


def test_an_image_smaller_than_the_crop_is_padded_to_the_crop():
    model = conv_model(1)
    pixels = image(5, 13)  # shorter than the crop, wider than it
    fixed = FixedSize(model, (8, 8))
    torch.testing.assert_close(slide_logits(fixed, pixels, CLASSES, 8, 5), whole_logits(model, pixels, CLASSES))


def test_a_head_at_a_lower_resolution_is_resized_to_the_input():
    head = nn.Sequential(nn.AvgPool2d(2), conv_model(1))
    assert whole_logits(head, image(10, 12), CLASSES).shape == (2, CLASSES, 10, 12)


def test_flip_averaging_makes_predictions_mirror_symmetric():
    model = conv_model(3)
    twin = conv_model(3)
    with torch.no_grad():
        twin.weight.copy_(model.weight.flip(3))  # twin(x) = mirror(model(mirror(x)))
    pixels = image()
    mirrored = pixels.flip(3)
    scores = predict_logits(model, pixels, CLASSES, flip=True)
    torch.testing.assert_close(predict_logits(twin, mirrored, CLASSES, flip=True), scores.flip(3))
    torch.testing.assert_close(predict_logits(model, mirrored, CLASSES, flip=True), scores.flip(3))
    # without flip averaging the model alone is not mirror-symmetric: the checks above have teeth
    unflipped = predict_logits(model, mirrored, CLASSES)
    assert not torch.allclose(unflipped, predict_logits(model, pixels, CLASSES).flip(3), atol=1e-3)


def test_flip_averaging_changes_nothing_for_a_symmetric_model_on_a_symmetric_image():
    model = conv_model(3)
    with torch.no_grad():
        model.weight.copy_((model.weight + model.weight.flip(3)) / 2)
    half = image(10, 6)
    pixels = torch.cat((half, half.flip(3)), 3)
    for options in ({"mode": "whole"}, {"mode": "slide", "crop": (6, 8), "stride": (4, 5)}):
        torch.testing.assert_close(
            predict_logits(model, pixels, CLASSES, flip=True, **options),
            predict_logits(model, pixels, CLASSES, **options),
        )


@pytest.mark.parametrize("model", [conv_model(3), GlobalContext()], ids=["3x3", "global"])
def test_multi_scale_with_the_one_scale_equals_single_scale(model):
    pixels = image()
    torch.testing.assert_close(
        predict_logits(model, pixels, CLASSES, scales=(1.0,)), whole_logits(model, pixels, CLASSES).softmax(1)
    )
    slide = {"mode": "slide", "crop": 6, "stride": 4}
    torch.testing.assert_close(
        predict_logits(model, pixels, CLASSES, scales=(1.0,), **slide),
        slide_logits(model, pixels, CLASSES, 6, 4).softmax(1),
    )
    torch.testing.assert_close(
        predict_logits(model, pixels, CLASSES, scales=(1.0,), base_size=10), predict_logits(model, pixels, CLASSES)
    )


def test_multi_scale_scores_are_probabilities_at_the_input_size():
    pixels = image()
    scores = predict_logits(
        conv_model(3), pixels, CLASSES, mode="slide", crop=6, stride=4, scales=(0.5, 1.5), flip=True
    )
    assert scores.shape == (2, CLASSES, 10, 13)
    torch.testing.assert_close(scores.sum(1), torch.ones(2, 10, 13))
    labels = predict(conv_model(3), pixels, CLASSES, mode="slide", crop=6, stride=4, scales=(0.5, 1.5), flip=True)
    assert torch.equal(labels, scores.argmax(1))


def test_augmentations_average_probabilities_not_logits():
    model = conv_model(3)
    pixels = image()
    plain = whole_logits(model, pixels, CLASSES)
    mirrored = whole_logits(model, pixels.flip(3), CLASSES).flip(3)
    expected = (plain.softmax(1) + mirrored.softmax(1)) / 2  # mmseg's aug_test
    torch.testing.assert_close(predict_logits(model, pixels, CLASSES, flip=True), expected)
    assert not torch.allclose(expected, ((plain + mirrored) / 2).softmax(1), atol=1e-4)
