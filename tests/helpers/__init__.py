"""What several test modules share and no test module defines: processes to start, projects to
run, data to seed. Test modules import these (tests/ is on sys.path through tests/conftest.py);
no test module imports another."""
