"""The committed stubs match the .proto contract."""

from mpcvit.proto import build


def test_generated_stubs_match_proto_files():
    assert build.proto_files(), "no .proto files found"
    assert build.check() == []
