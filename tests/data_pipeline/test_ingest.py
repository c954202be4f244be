"""read_interactions: every format, local and memory:// URLs, and precise errors on bad input."""

from __future__ import annotations

import gzip
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.ingest import INTERACTIONS_SCHEMA, DataError, read_interactions
from data_pipeline.config import ColumnMapping, DataConfig


@pytest.fixture(params=["local", "memory"])
def put(request, tmp_path):
    """put(name, bytes) -> URL of a file holding the bytes, on local disk or in fsspec's memory filesystem."""
    root = str(tmp_path) if request.param == "local" else f"memory://ingest-{uuid.uuid4().hex}"

    def _put(name: str, data: bytes) -> str:
        url = f"{root}/{name}"
        with fsspec.open(url, "wb") as f:
            f.write(data)
        return url

    yield _put
    if request.param == "memory":
        fs = fsspec.filesystem("memory")
        if fs.exists(root):
            fs.rm(root, recursive=True)


def read(url: str, fmt: str, **kwargs) -> dict:
    table = read_interactions(DataConfig(path=url, format=fmt, **kwargs))
    assert table.schema == INTERACTIONS_SCHEMA
    return table.to_pydict()


# --------------------------------------------------------------------------------------
# Formats


def test_sasrec_uses_line_order_as_time(put):
    url = put("seq.txt", b"1 10\n1 11\n2 10\n")
    assert read(url, "sasrec") == {
        "user": ["1", "1", "2"],
        "item": ["10", "11", "10"],
        "timestamp": [0, 1, 2],
        "rating": [None, None, None],
    }


def test_sasrec_tolerates_tabs_runs_of_spaces_and_blank_lines(put):
    url = put("seq.txt", b"1 10\r\n\n  1\t\t11 \n2   10\n\n")
    got = read(url, "sasrec")
    assert (got["user"], got["item"], got["timestamp"]) == (["1", "1", "2"], ["10", "11", "10"], [0, 1, 2])


def test_sasrec_gzip_is_decompressed(tmp_path):
    path = tmp_path / "seq.txt.gz"
    path.write_bytes(gzip.compress(b"1 7\n1 8\n"))
    assert read(str(path), "sasrec")["item"] == ["7", "8"]


def test_movielens_udata(put):
    url = put("u.data", b"196\t242\t3\t881250949\n186\t302\t4\t891717742\n")
    assert read(url, "movielens_udata") == {
        "user": ["196", "186"],
        "item": ["242", "302"],
        "timestamp": [881250949, 891717742],
        "rating": [3.0, 4.0],
    }


def test_movielens_dat(put):
    url = put("ratings.dat", b"1::1193::5::978300760\n1::661::3::978302109\n")
    assert read(url, "movielens_dat") == {
        "user": ["1", "1"],
        "item": ["1193", "661"],
        "timestamp": [978300760, 978302109],
        "rating": [5.0, 3.0],
    }


def test_csv_with_column_mapping_and_delimiter(put):
    url = put("log.csv", b'uid;extra;iid;ts;stars\nu1;x;"i;1";100;4.5\nu2;y;i2;50;\n')
    columns = ColumnMapping(user="uid", item="iid", timestamp="ts", rating="stars")
    assert read(url, "csv", columns=columns, csv_delimiter=";") == {
        "user": ["u1", "u2"],
        "item": ["i;1", "i2"],  # quoting protects the delimiter
        "timestamp": [100, 50],
        "rating": [4.5, None],  # an empty rating is null
    }


def test_csv_with_byte_order_mark(put):
    url = put("log.csv", "\ufeffuser_id,item_id,timestamp\na,x,1\n".encode())
    assert read(url, "csv")["user"] == ["a"]


def test_csv_without_timestamp_uses_line_order(put):
    url = put("log.csv", b"user_id,item_id\na,x\na,y\n")
    got = read(url, "csv", columns=ColumnMapping(timestamp=None))
    assert got["timestamp"] == [0, 1] and got["rating"] == [None, None]


def test_parquet_casts_ids_to_strings(put, tmp_path):
    table = pa.table({"user_id": [7, 7, 8], "item_id": [1, 2, 1], "timestamp": [3, 1, 2], "r": [1, 5, 3]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    url = put("log.parquet", sink.getvalue().to_pybytes())
    assert read(url, "parquet", columns=ColumnMapping(rating="r")) == {
        "user": ["7", "7", "8"],
        "item": ["1", "2", "1"],
        "timestamp": [3, 1, 2],
        "rating": [1.0, 5.0, 3.0],
    }


def test_min_rating_filters_rated_rows_and_keeps_unrated(put):
    url = put("u.data", b"1\t1\t5\t1\n1\t2\t2\t2\n1\t3\t4\t3\n")
    assert read(url, "movielens_udata", min_rating=4)["item"] == ["1", "3"]
    csv_url = put("log.csv", b"user_id,item_id,timestamp,r\na,x,1,1\na,y,2,\na,z,3,5\n")
    got = read(csv_url, "csv", columns=ColumnMapping(rating="r"), min_rating=3)
    assert got["item"] == ["y", "z"]


# --------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "fmt, data, line, fragment",
    [
        ("sasrec", b"1 1\n1 2\n1 2 3\n", 3, "expected 2 fields"),
        ("sasrec", b"1 1\n\n1\n", 3, "expected 2 fields"),
        ("movielens_udata", b"1\t1\t5\t10\n1\t2\t4\tyesterday\n", 2, "timestamp must be an integer"),
        ("movielens_udata", b"1\t1\t5\t10\n1\t2\t4\t1.5\n", 2, "timestamp must be an integer"),
        ("movielens_udata", b"1\t1\t5\t10\n1\t2\t4\n", 2, "expected 4 fields"),
        ("movielens_dat", b"1::1::5::10\n1::2::good::11\n", 2, "rating must be a number"),
        ("movielens_dat", b"1::1::5::10\n1::2::4::\n", 2, "timestamp must be an integer"),
        ("sasrec", b"1 1\n1 \xff\xfe\n", 2, "UTF-8"),
        ("sasrec", b"57 1\n57 abc\n", 2, "item id must be an integer in this format, got 'abc'"),
        ("movielens_dat", b"1::1::5::10\nu2::2::4::11\n", 2, "user id must be an integer"),
    ],
)
def test_malformed_line_names_file_and_line(put, fmt, data, line, fragment):
    url = put("bad.txt", data)
    with pytest.raises(DataError) as err:
        read_interactions(DataConfig(path=url, format=fmt))
    message = str(err.value)
    assert url in message and f"line {line}:" in message and fragment in message


@pytest.mark.parametrize(
    "data, line, fragment",
    [
        (b"user_id,item_id,timestamp\na,x,1\na,y\n", 3, "expected 3 fields"),
        (b"user_id,item_id,timestamp\na,x,1\na,y,soon\n", 3, "timestamp must be an integer"),
        (b"user_id,item_id,timestamp\na,x,1\n,y,2\n", 3, "empty user id"),
    ],
)
def test_malformed_csv_names_file_and_line(put, data, line, fragment):
    url = put("bad.csv", data)
    with pytest.raises(DataError) as err:
        read_interactions(DataConfig(path=url, format="csv"))
    message = str(err.value)
    assert url in message and f"line {line}:" in message and fragment in message


@pytest.mark.parametrize("data", [b"", b"\n  \n"])
def test_empty_file_is_an_error(put, data):
    url = put("empty.txt", data)
    with pytest.raises(DataError, match="empty"):
        read_interactions(DataConfig(path=url, format="sasrec"))


def test_header_only_csv_is_an_error(put):
    url = put("log.csv", b"user_id,item_id,timestamp\n")
    with pytest.raises(DataError, match="no interactions"):
        read_interactions(DataConfig(path=url, format="csv"))


def test_missing_file(tmp_path):
    url = str(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="not found") as err:
        read_interactions(DataConfig(path=url, format="sasrec"))
    assert url in str(err.value)


def test_a_directory_given_as_the_input_file(tmp_path):
    with pytest.raises(DataError, match="is a directory, not a file") as err:
        read_interactions(DataConfig(path=str(tmp_path), format="sasrec"))
    assert str(tmp_path) in str(err.value)


def test_unknown_format_names_the_valid_ones(tmp_path):
    # The config schema already rejects unknown formats; this guards callers that bypass it.
    cfg = DataConfig(path=str(tmp_path / "x"), format="sasrec").model_copy(update={"format": "xml"})
    with pytest.raises(DataError, match="xml.*sasrec, movielens_udata, movielens_dat, csv, parquet"):
        read_interactions(cfg)


def test_missing_csv_column_names_the_available_ones(put):
    url = put("log.csv", b"uid,item_id,timestamp\na,x,1\n")
    with pytest.raises(DataError, match=r"'user_id' \(data.columns.user\).*columns in the file: uid, item_id, timestamp"):
        read_interactions(DataConfig(path=url, format="csv"))


def test_missing_parquet_column_names_the_available_ones(put):
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"user_id": ["a"], "item_id": ["x"]}), sink)
    url = put("log.parquet", sink.getvalue().to_pybytes())
    with pytest.raises(DataError, match=r"'timestamp'.*set it to null.*columns in the file: user_id, item_id"):
        read_interactions(DataConfig(path=url, format="parquet"))
