"""The label rules: which images are positive, negative or kept out of a target on purpose.

``physeal`` (the mission): positive when an E/1–E/4 code is listed *and* the fracture is
visible on this film. The AO code is the episode's diagnosis copied onto every film of the
patient, so a physeal code on a film without a visible fracture (a follow-up) is ambiguous:
it is excluded (``physeal_code_not_visible``) unless configured to count as negative. Other
fractures, E/7 avulsions and normal films are negatives.
``fracture`` (thesis-comparable): the film's ``fracture_visible`` flag.
"""

from __future__ import annotations

from dataclasses import dataclass

from physis.ao import AOCode

TARGETS = ("physeal", "fracture")


@dataclass(frozen=True)
class Label:
    """``value`` is 1/0, or None when the image is excluded for ``exclusion`` (a reason code)."""

    value: int | None
    sh_type: int | None = None
    exclusion: str | None = None


def label_image(
    codes: list[AOCode],
    fracture_visible: bool,
    target: str = "physeal",
    not_visible: str = "exclude",
    diagnosis_uncertain: bool = False,
    exclude_uncertain: bool = False,
) -> Label:
    """Apply the target's rule to one image's parsed AO codes and visibility flag."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
    if exclude_uncertain and diagnosis_uncertain:
        return Label(None, exclusion="diagnosis_uncertain")
    sh_types = [code.salter_harris for code in codes if code.is_physeal]
    # The most severe Salter-Harris type describes a film with two physeal codes.
    sh_type = max(sh_types) if sh_types else None
    if target == "fracture":
        return Label(int(fracture_visible), sh_type if fracture_visible else None)
    if not sh_types:
        return Label(0)
    if fracture_visible:
        return Label(1, sh_type)
    if not_visible == "negative":
        return Label(0)
    return Label(None, exclusion="physeal_code_not_visible")
