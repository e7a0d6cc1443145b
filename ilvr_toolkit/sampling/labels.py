"""Class labels for a class-conditional model (``--class_labels``), one per reference."""

from pathlib import Path

from ..cli import UsageError


def resolve_class_labels(
    spec: int | list[int] | str | None, names: list[str], num_classes: int | None
) -> list[int] | None:
    """The label of each reference ``names[i]`` (None for a model without classes) from ``spec``: one
    label for all, a list (one per reference) or the path of a file of ``<reference name> <label>``
    lines (``#`` comments, commas allowed). UsageError naming ``--class_labels`` when labels are
    missing, unexpected or out of [0, num_classes)."""
    if num_classes is None:
        if spec is not None:
            raise UsageError("--class_labels: the model is not class-conditional; leave the flag out")
        return None
    if spec is None:
        raise UsageError(
            f"--class_labels: the model is class-conditional ({num_classes} classes); give one label for "
            "every image, a list (one per reference) or a file of '<reference name> <label>' lines"
        )
    if isinstance(spec, list):
        if len(spec) != len(names):
            raise UsageError(f"--class_labels: {len(spec)} labels given for {len(names)} references")
        labels = [int(label) for label in spec]
    elif isinstance(spec, int) or spec.strip().lstrip("-").isdigit():
        labels = [int(spec)] * len(names)
    else:
        labels = _read_label_file(Path(spec), names)
    if bad := [label for label in labels if not 0 <= label < num_classes]:
        raise UsageError(f"--class_labels: label {bad[0]} is out of range; expected 0..{num_classes - 1}")
    return labels


def _read_label_file(path: Path, names: list[str]) -> list[int]:
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise UsageError(f"--class_labels: cannot read {path}: {err.strerror or err}") from None
    rows = [line.split("#")[0].replace(",", " ").rsplit(maxsplit=1) for line in lines]
    bad = [n for n, row in enumerate(rows, 1) if row and (len(row) != 2 or not row[1].lstrip("-").isdigit())]
    if bad:
        raise UsageError(f"--class_labels: {path} line {bad[0]}: expected '<reference name> <label>'")
    table = {row[0].strip(): int(row[1]) for row in rows if row}
    if missing := [name for name in names if name not in table]:
        raise UsageError(
            f"--class_labels: {path} has no label for reference {missing[0]!r} ({len(missing)} missing)"
        )
    return [table[name] for name in names]
