"""Settings: the shipped file validates; broken files give one clear error naming file, key, value."""
import pytest
import yaml

from autoalign.settings import DEFAULT_SETTINGS_PATH, SettingsError, load_settings


@pytest.fixture()
def raw():
    return yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text())


def _write(tmp_path, data):
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_default_settings_load():
    s = load_settings()
    assert s.optics.numerical_aperture == 1.4 and s.optics.wavelength_um == 0.775
    assert s.stack.planes == s.camera.roi_px
    assert load_settings(s) is s


@pytest.mark.parametrize(
    "section, key, value, words",
    [
        ("optics", "wavelength_um", -0.5, ["optics.wavelength_um", "-0.5", "> 0.0"]),
        ("optics", "numerical_aperture", 1.6, ["optics.numerical_aperture", "1.6", "immersion_index"]),
        ("camera", "roi_px", "big", ["camera.roi_px", "'big'", "an integer"]),
        ("optics", "beam", "donut", ["optics.beam", "'donut'", "'vortex'"]),
        ("slm", "pupil_centre_px", [1.0], ["slm.pupil_centre_px", "2 values"]),
        ("stack", "planes", 32, ["stack.planes", "camera.roi_px"]),
    ],
)
def test_bad_values_named(tmp_path, raw, section, key, value, words):
    raw[section][key] = value
    path = _write(tmp_path, raw)
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    msg = str(info.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, msg


def test_missing_and_unknown_keys(tmp_path, raw):
    # a file is merged over the packaged defaults: a missing key takes the default, an unknown
    # key is refused with the nearest valid one; a complete mapping (settings_from_dict, as stored
    # in data files) must still hold every key
    from autoalign.settings import settings_from_dict

    del raw["camera"]["pixel_size_um"]
    raw["camera"]["pixel_sise_um"] = 0.04
    with pytest.raises(SettingsError) as info:
        load_settings(_write(tmp_path, raw))
    msg = str(info.value)
    assert "camera.pixel_sise_um': unknown key (did you mean 'camera.pixel_size_um'?" in msg
    del raw["camera"]["pixel_sise_um"]
    with pytest.raises(SettingsError, match="camera.pixel_size_um' is missing"):
        settings_from_dict(raw, "stored")


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("optics: [unclosed")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load_settings(p)
    p.write_text("- a list\n")
    with pytest.raises(SettingsError, match="mapping"):
        load_settings(p)


def test_replace_revalidates():
    s = load_settings()
    assert s.replace(**{"camera.roi_px": 32, "stack.planes": 32}).camera.roi_px == 32
    with pytest.raises(SettingsError):
        s.replace(**{"optics.wavelength_um": 0.0})


def test_optional_keys_default_but_core_keys_required(tmp_path, raw):
    del raw["loop"]["patience"]
    s = load_settings(_write(tmp_path, raw))
    assert s.loop.patience == 2
    del raw["loop"]["gain"]
    from autoalign.settings import settings_from_dict

    with pytest.raises(SettingsError, match="loop.gain' is missing"):
        settings_from_dict(raw, "stored")
