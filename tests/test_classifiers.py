import pickle
import urllib.error

import pytest
import torch
import torch.nn as nn
import torchvision

import juap
from juap.classifiers import create_classifier, load_classifier, save_classifier

TORCHVISION_NAMES = [
    "resnet18",
    "resnet34",
    "resnet50",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "resnet101",
    "resnet152",
]
ADAPTED = [
    ("torchvision", "mobilenet_v2"),
    ("torchvision", "regnet_x_400mf"),
    ("torchvision", "efficientnet_b0"),
    ("torchvision", "resnext50_32x4d"),
]


def _x(n=2, h=64, w=64, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_every_name():
    names = juap.list_classifiers()
    for n in ["resnet18", "densenet121", "small_resnet", "torchvision", "timm"]:
        assert n in names


@pytest.mark.parametrize("name", TORCHVISION_NAMES)
def test_torchvision_classifiers_face(name):
    torch.manual_seed(0)
    clf = create_classifier(name, num_classes=7)
    x = _x(1, 64, 64)
    with torch.no_grad():
        feats = clf.forward_features(x)
        logits = clf.forward_head(feats)
        native = clf.model(clf.normalize(x))
    assert logits.shape == (1, 7)
    assert feats.shape[1] == clf.fc.in_features == clf.num_features
    assert feats.min() >= 0, "the CAM map is taken after its activation"
    # GAP of the features through the linear head reproduces the network's own logits.
    torch.testing.assert_close(logits, native, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        logits, feats.mean((2, 3)) @ clf.fc.weight.T + clf.fc.bias, rtol=1e-5, atol=1e-5
    )


def test_resnet_cam_layer_is_layer4_output_and_densenet_is_relu_of_features():
    r = create_classifier("resnet18")
    x = _x()
    with torch.no_grad():
        captured = {}
        h = r.model.layer4.register_forward_hook(lambda m, a, o: captured.setdefault("o", o))
        r(x)
        h.remove()
        assert torch.equal(r.forward_features(x), captured["o"])
        d = create_classifier("densenet121")
        ref = torch.relu(d.model.features(d.normalize(x)))
        assert torch.equal(d.forward_features(x), ref)
        assert (d.model.features(d.normalize(x)) < 0).any(), "norm5 output has negatives: the ReLU matters"


@pytest.mark.parametrize("name,arch", ADAPTED)
def test_torchvision_adapter(name, arch):
    clf = create_classifier(name, arch=arch, num_classes=3)
    x = _x(2)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), clf.model(clf.normalize(x)), rtol=1e-5, atol=1e-5)
        assert clf.forward_features(x).dim() == 4


def test_timm_adapter():
    pytest.importorskip("timm")
    clf = create_classifier("timm", arch="resnet18", num_classes=4)
    x = _x(2)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), clf.model(clf.normalize(x)), rtol=1e-5, atol=1e-5)


def test_adapter_refuses_a_non_gap_linear_cnn():
    with pytest.raises(juap.ConfigError, match="not a GAP"):
        create_classifier("torchvision", arch="vgg11")
    with pytest.raises(juap.ConfigError, match="no model"):
        create_classifier("torchvision", arch="resnet_does_not_exist")


def test_small_resnet_map_is_at_least_8x8_at_64():
    clf = create_classifier("small_resnet", num_classes=6)
    feats = clf.forward_features(_x(2))
    assert feats.shape[-2:] == (8, 8)
    assert clf(_x(2)).shape == (2, 6)


def test_input_shape_is_checked():
    clf = create_classifier("small_resnet")
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        clf(torch.rand(3, 64, 64))


def test_num_classes_replaces_head():
    clf = create_classifier("resnet18")
    assert clf.num_classes == 1000
    clf.replace_head(5)
    assert clf.fc.out_features == 5 and clf.model.fc is clf.fc


def test_save_and_load_roundtrip(tmp_path):
    clf = create_classifier("small_resnet", num_classes=6, widths=(8, 16, 32))
    path = save_classifier(clf, tmp_path / "c.safetensors")
    again = load_classifier(path)
    assert again.arch == "small_resnet" and again.num_classes == 6
    x = _x()
    with torch.no_grad():
        assert torch.equal(clf(x), again(x))


def test_loads_a_plain_torchvision_state_dict(tmp_path):
    tv = torchvision.models.resnet18(num_classes=10)
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    clf = create_classifier("resnet18", weights=str(tmp_path / "r18.pth"))
    assert clf.num_classes == 10  # taken from the checkpoint's head
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(clf(x), tv.eval()(clf.normalize(x)), rtol=0, atol=1e-6)


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(juap.CheckpointError, match="does not fit classifier 'densenet121'"):
        create_classifier("densenet121", weights=str(tmp_path / "r18.pth"))
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18b.pth")
    with pytest.raises(juap.CheckpointError, match="shapes differ|does not fit"):
        create_classifier("resnet50", weights=str(tmp_path / "r18b.pth"))
    clf = create_classifier("small_resnet", num_classes=6)
    save_classifier(clf, tmp_path / "s.safetensors")
    with pytest.raises(juap.CheckpointError, match="saved for classifier 'small_resnet', not 'resnet18'"):
        create_classifier("resnet18", weights=str(tmp_path / "s.safetensors"))


def test_checkpoint_with_another_class_count(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "r.pth")
    with pytest.raises(juap.CheckpointError, match="10 classes but num_classes=4"):
        create_classifier("resnet18", weights=str(tmp_path / "r.pth"), num_classes=4)
    clf = create_classifier("resnet18", weights=str(tmp_path / "r.pth"), num_classes=4, reset_head=True)
    assert clf.num_classes == 4
    tv = torchvision.models.resnet18(num_classes=10)
    tv.load_state_dict(torch.load(tmp_path / "r.pth", weights_only=True))
    assert torch.equal(clf.model.layer1[0].conv1.weight, tv.layer1[0].conv1.weight)


def test_missing_truncated_and_unsafe_checkpoints(tmp_path):
    with pytest.raises(juap.CheckpointError, match="does not exist"):
        create_classifier("resnet18", weights=str(tmp_path / "nope.pth"))
    clf = create_classifier("small_resnet")
    path = save_classifier(clf, tmp_path / "s.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(juap.CheckpointError, match="truncated"):
        create_classifier("small_resnet", weights=str(tmp_path / "cut.safetensors"))

    class Evil:
        def __reduce__(self):
            return (print, ("this would run code",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(juap.CheckpointError, match="refused"):
        create_classifier("resnet18", weights=str(tmp_path / "evil.pth"))


def test_unreachable_weight_enum_is_a_clear_error(monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(juap.WeightsUnavailableError, match="IMAGENET1K_V1.*weights=/path/to/file.pth"):
        create_classifier("resnet18", weights="IMAGENET1K_V1")
    with pytest.raises(juap.ConfigError, match="IMAGENET1K_V1"):
        create_classifier("resnet18", weights="IMAGENET_V9")


def test_unknown_name_suggests_and_lists():
    with pytest.raises(juap.JuapError, match="Did you mean 'resnet18'.*small_resnet"):
        create_classifier("resnet19")


def test_bad_num_classes():
    with pytest.raises(juap.ConfigError, match="num_classes"):
        create_classifier("small_resnet", num_classes=0)


def test_wrapper_keeps_native_names_for_state_dicts():
    clf = create_classifier("resnet18")
    assert set(clf.model.state_dict()) == set(torchvision.models.resnet18().state_dict())
    assert isinstance(clf.fc, nn.Linear)
