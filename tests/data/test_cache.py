from tests.conftest import run_cli, write_image_folder


def test_a_cache_path_through_a_file_is_named_once_as_a_file(tmp_path):
    # a check-data run stores three entries (the decoded folder, two sets of hashes): it printed the same note three
    # times, each with makedirs' "File exists", which says nothing about what to change
    root = write_image_folder(str(tmp_path / "d"))
    (tmp_path / "cache").write_text("not a folder")
    proc = run_cli("check-data", root, env={"CNNKIT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if "data cache" in line]
    assert len(notes) == 1, proc.stderr
    assert f"{tmp_path / 'cache'} is a file, not a folder" in notes[0] and "CNNKIT_CACHE" in notes[0]
