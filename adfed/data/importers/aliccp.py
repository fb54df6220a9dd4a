"""Ali-CCP (ESMM's dataset, Tianchi 408) in torch-rechub's flat CSV layout.

Source: ``ali_ccp_{train,val,test}*.csv`` as written by torch-rechub's
``preprocess_ali_ccp.py``: ``click, purchase``, 23 label-encoded sparse columns (named
by Tianchi field id, e.g. ``101``, ``109_14``) and 8 float ``D*`` columns. ``src`` is one
file or a directory; a directory's CSV files are read train, val, test (by name), then
any others by name, and concatenated.

Mapping (field names are ``f`` + the Tianchi id, as schema names must be identifiers):

- client = ``101`` (user id); USER fields ``f121`` .. ``f129`` (profile, gender, age,
  consumption levels, occupation, geography);
- ad = a distinct combination of the item ``205`` and its fields ``206`` (category),
  ``207`` (shop), ``210`` (intention node), ``216`` (brand). torch-rechub's encoding maps
  rare items to one shared id (``205 = 0`` carries many categories and shops), so the
  item id alone would merge different ads; the item is kept as AD field ``f205``;
- CONTEXT categoricals: ``f301`` (position), crosses ``f508, f509, f702, f853``, history
  ``f109_14, f110_14, f127_14, f150_14``; CONTEXT DENSE: the ``D*`` columns, unchanged;
- ``click``; ``conversion = purchase`` (a purchase without a click is an error);
- there is no time in these files: ``timestamp`` = the row's position in the
  concatenated input, so train rows come before val rows before test rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from adfed.data.importers.raw import (
    RawField,
    RawImport,
    binary_column,
    float_column,
    int_column,
    read_csv,
)
from adfed.data.schema import Entity, FieldKind
from adfed.errors import DataError

FIX = "give torch-rechub's ali_ccp_{train,val,test}.csv (a file or their directory)"
USER_COLUMNS = {
    "121": "user profile category", "122": "user profile group", "124": "user gender",
    "125": "user age", "126": "user consumption level I", "127": "user consumption level II",
    "128": "user occupation (working or not)", "129": "user geography",
}
AD_COLUMNS = {
    "205": "item id", "206": "item category", "207": "item shop",
    "210": "item intention node", "216": "item brand",
}
CONTEXT_COLUMNS = {
    "301": "position (scenario)", "508": "cross of 109_14 and 206",
    "509": "cross of 110_14 and 207", "702": "cross of 127_14 and 216",
    "853": "cross of 150_14 and 210", "109_14": "user history: category",
    "110_14": "user history: shop", "127_14": "user history: brand",
    "150_14": "user history: intention node",
}
DENSE_COLUMNS = ["D109_14", "D110_14", "D127_14", "D150_14", "D508", "D509", "D702", "D853"]
SPARSE = {**USER_COLUMNS, **AD_COLUMNS, **CONTEXT_COLUMNS}
REQUIRED = ["click", "purchase", "101", *SPARSE, *DENSE_COLUMNS]
_SPLIT_ORDER = ("train", "val", "test")


def _fields() -> tuple[RawField, ...]:
    entity = {**dict.fromkeys(USER_COLUMNS, Entity.USER), **dict.fromkeys(AD_COLUMNS, Entity.AD),
              **dict.fromkeys(CONTEXT_COLUMNS, Entity.CONTEXT)}
    sparse = tuple(
        RawField(name=f"f{col}", kind=FieldKind.CATEGORICAL, entity=entity[col],
                 description=f"{meaning}, Tianchi field {col}")
        for col, meaning in SPARSE.items()
    )
    dense = tuple(
        RawField(name=col, kind=FieldKind.DENSE, entity=Entity.CONTEXT,
                 description=f"feature value of field {col[1:]}, raw `{col}`")
        for col in DENSE_COLUMNS
    )
    return sparse + dense


def source_files(src: Path) -> tuple[Path, ...]:
    """The CSV files to read: ``src`` itself, or a directory's CSVs in split order."""
    if src.is_file():
        return (src,)
    if not src.is_dir():
        raise DataError(f"{src}: not found; {FIX}")
    files = sorted(src.glob("*.csv"))
    if not files:
        raise DataError(f"{src}: directory holds no .csv files; {FIX}")

    def rank(p: Path) -> tuple[int, str]:
        hits = [i for i, split in enumerate(_SPLIT_ORDER) if split in p.stem.lower()]
        return (hits[0] if hits else len(_SPLIT_ORDER), p.name)

    return tuple(sorted(files, key=rank))


def _read(path: Path) -> pd.DataFrame:
    frame = read_csv(path, what="Ali-CCP CSV", fix=FIX, columns=REQUIRED)
    out = {"raw_user": int_column(frame, "101", path, FIX)}
    click = binary_column(frame, "click", path, FIX)
    purchase = binary_column(frame, "purchase", path, FIX)
    bad = np.flatnonzero(purchase > click)
    if len(bad):
        raise DataError(f"{path}: column 'purchase' is 1 where 'click' is 0 "
                        f"(data row {int(bad[0])}); a conversion needs a click; {FIX}")
    out.update({"click": click, "conversion": purchase, "raw_ad": int_column(frame, "205", path, FIX)})
    out.update({f"f{col}": int_column(frame, col, path, FIX) for col in SPARSE})
    out.update({col: float_column(frame, col, path, FIX) for col in DENSE_COLUMNS})
    return pd.DataFrame(out)


def load(src: Path) -> RawImport:
    """Read Ali-CCP CSV file(s) into a :class:`RawImport` (module docstring).

    Raises
    ------
    DataError
        No CSV found, an unreadable file, a missing column, a non-integer sparse id, a
        non-numeric dense value, a label not 0/1, or a purchase without a click.
    """
    files = source_files(Path(src))
    table = pd.concat([_read(p) for p in files], ignore_index=True)
    table["timestamp"] = np.arange(len(table), dtype=np.int64)
    return RawImport(
        frame=table,
        fields=_fields(),
        sources=files,
        user_description="Ali-CCP user (raw field `101`)",
        ad_description="an item with its category, shop, intention node and brand (205..216)",
        stats={"files": len(files)},
    )
