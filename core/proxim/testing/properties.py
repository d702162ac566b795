"""The properties a part may claim (`PROPERTIES`), and the check that what a part claims is known."""

from __future__ import annotations

import difflib

import attrs

from proxim.parts import Part
from proxim.testing.check import CheckFailure, Context


@attrs.frozen
class Property:
    """A property a part may claim: the kinds it applies to and what it means."""

    name: str
    kinds: frozenset[str]
    meaning: str


PROPERTIES: dict[str, Property] = {
    p.name: p
    for p in (
        Property(
            "group_independent", frozenset({"baseline", "advantage"}), "changing the responses of one prompt group leaves every other group's output unchanged"
        ),
        Property(
            "permutation_equivariant",
            frozenset({"baseline", "advantage"}),
            "permuting the rows of the batch (with their group ids) permutes the output the same way",
        ),
        Property("shift_equivariant", frozenset({"baseline"}), "adding c_g to every reward of group g adds c_g to that group's baselines"),
        Property("shift_invariant", frozenset({"advantage"}), "adding c_g to every reward of group g leaves all advantages unchanged"),
        Property("zero_sum_per_group", frozenset({"advantage"}), "within each group, the rows' advantages (each row's mean over its valid tokens) sum to 0"),
        Property("degenerate_groups_zero", frozenset({"advantage"}), "a group whose rewards are all equal (a group of one included) gets advantage 0"),
        Property("outcome_broadcast", frozenset({"advantage"}), "with sequence rewards, the advantage is constant over each row's valid tokens"),
        Property("pg_at_anchor", frozenset({"region"}), "at logprobs == anchor (ratio 1) the gradient -dloss/dlogprob equals A at every valid token"),
        Property("value_at_anchor", frozenset({"region"}), "at ratio 1 the loss is -A at every valid token"),
        Property(
            "zero_grad_clipped_side",
            frozenset({"region"}),
            "far past the trust region in the direction A pushes (p -> 1 for A > 0, p -> 0 for A < 0, from anchor probabilities in [0.2, 0.5]) the gradient is exactly 0",
        ),
        Property(
            "bounded_weight",
            frozenset({"region"}),
            "the gradient's weight g / A stops growing with the ratio: in magnitude it is no larger at log-ratios of +-15 and +-19.5 than its largest value for log-ratios within +-10",
        ),
        Property("positively_homogeneous", frozenset({"region"}), "loss(a A) == a loss(A), and the same for the gradient, for every a > 0"),
        Property("tokens_independent", frozenset({"region"}), "each token's loss and gradient depend only on that token's inputs"),
    )
}
"""Every property a part may declare, by name."""


def properties_known(part: Part, ctx: Context) -> None:
    """Every property the part declares is one of `PROPERTIES`, for its kind."""
    declared = part.declared_properties()
    if not isinstance(declared, (set, frozenset)) or not all(isinstance(p, str) for p in declared):
        raise CheckFailure(f"declared_properties() returned {declared!r}; properties are a frozenset of names.")
    for name in sorted(declared):
        prop = PROPERTIES.get(name)
        if prop is None:
            close = difflib.get_close_matches(name, list(PROPERTIES), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            known = ", ".join(p.name for p in PROPERTIES.values() if part.kind in p.kinds)
            raise CheckFailure(f"it declares the unknown property {name!r}.{hint} Properties of a {part.kind}: {known}.")
        if part.kind not in prop.kinds:
            kinds = " and ".join(sorted(prop.kinds))
            raise CheckFailure(f"it declares {name!r}, a property of {kinds} parts, but it is {'an' if part.kind[0] in 'aeiou' else 'a'} {part.kind}.")
