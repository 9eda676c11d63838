"""The physeal and fracture label rules."""

import pytest

from physis.ao import parse_field
from physis.labels import label_image


def lab(field, visible, **kw):
    return label_image(parse_field(field), visible, **kw)


def test_physeal_visible_is_positive_with_sh_type():
    result = lab("23r-E/2.1; 23u-E/7", True)
    assert (result.value, result.sh_type, result.exclusion) == (1, 2, None)


def test_most_severe_sh_type_wins():
    assert lab("23u-E/1; 23r-E/4", True).sh_type == 4


@pytest.mark.parametrize("field", ["23u-E/7", "23r-M/3.1", "", "72B(b)", "23r-M/2.1; 23u-E/7"])
@pytest.mark.parametrize("visible", [True, False])
def test_avulsions_other_fractures_and_normals_are_negative(field, visible):
    assert lab(field, visible).value == 0


def test_physeal_code_not_visible_is_excluded_by_default():
    result = lab("23r-E/2.1", False)
    assert result.value is None and result.exclusion == "physeal_code_not_visible"


def test_physeal_code_not_visible_can_count_as_negative():
    assert lab("23r-E/2.1", False, not_visible="negative").value == 0


def test_fracture_target_uses_visibility_only():
    assert lab("23r-M/3.1", True, target="fracture").value == 1
    assert lab("23r-E/2.1", False, target="fracture").value == 0
    assert lab("", True, target="fracture").value == 1


def test_uncertain_excluded_only_when_asked():
    assert lab("23r-E/2.1", True, diagnosis_uncertain=True).value == 1
    result = lab("23r-E/2.1", True, diagnosis_uncertain=True, exclude_uncertain=True)
    assert result.value is None and result.exclusion == "diagnosis_uncertain"


def test_unknown_target_is_an_error():
    with pytest.raises(ValueError, match="unknown target"):
        lab("", True, target="elbow")
