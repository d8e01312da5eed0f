"""Which student hidden state is distilled from which teacher hidden state.

Indexing convention (Hugging Face ``output_hidden_states=True``): a model with ``L`` layers
returns ``L + 1`` hidden states; index 0 is the embedding output and index ``i`` (1..L) the
output of layer ``i``. A layer map is a tuple of ``(student_index, teacher_index)`` pairs in
that convention, so ``hidden_states[s]`` of the student is matched to ``hidden_states[t]`` of
the teacher.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["LayerMap", "explicit_layer_map", "last_k_layer_map", "uniform_layer_map"]

LayerMap = tuple[tuple[int, int], ...]


def _check_depth(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive number of layers, got {value!r}")
    return value


def uniform_layer_map(student_layers: int, teacher_layers: int, *,
                      embeddings: bool = True) -> LayerMap:
    """TinyBERT's uniform map: student layer ``m`` <- teacher layer ``m * L_t // L_s``.

    ``m`` runs over 1..L_s (the last student layer meets the last teacher layer), plus ``m = 0``
    (embeddings <- embeddings) when ``embeddings``. Example: 4 student and 12 teacher layers give
    ``((0, 0), (1, 3), (2, 6), (3, 9), (4, 12))``.
    """
    ls = _check_depth("student_layers", student_layers)
    lt = _check_depth("teacher_layers", teacher_layers)
    if ls > lt:
        raise ValueError(f"student_layers: a uniform map needs student_layers <= teacher_layers, "
                         f"got {ls} > {lt}")
    first = 0 if embeddings else 1
    return tuple((m, m * lt // ls) for m in range(first, ls + 1))


def last_k_layer_map(student_layers: int, teacher_layers: int, k: int) -> LayerMap:
    """The last ``k`` layers of each model, in order: student ``L_s-k+i`` <- teacher ``L_t-k+i``."""
    ls = _check_depth("student_layers", student_layers)
    lt = _check_depth("teacher_layers", teacher_layers)
    k = _check_depth("k", k)
    if k > min(ls, lt):
        raise ValueError(f"k: at most min(student_layers, teacher_layers) = {min(ls, lt)}, "
                         f"got {k}")
    return tuple((ls - k + i, lt - k + i) for i in range(1, k + 1))


def explicit_layer_map(pairs: Iterable[tuple[int, int]], student_layers: int,
                       teacher_layers: int) -> LayerMap:
    """``pairs`` of ``(student_index, teacher_index)``, checked against both models' depths."""
    ls = _check_depth("student_layers", student_layers)
    lt = _check_depth("teacher_layers", teacher_layers)
    checked = []
    for i, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(f"pairs[{i}]: expected (student_index, teacher_index), got {pair!r}")
        s, t = (int(v) for v in pair)
        if not (0 <= s <= ls and 0 <= t <= lt):
            raise ValueError(f"pairs[{i}]: indices must lie in 0..{ls} (student) and 0..{lt} "
                             f"(teacher; 0 is the embeddings), got {pair!r}")
        checked.append((s, t))
    if not checked:
        raise ValueError("pairs: expected at least one (student_index, teacher_index) pair")
    return tuple(checked)
