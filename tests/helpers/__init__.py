"""Code the tests share that is not a fixture: the bad-input table and runner, the step-3 frozen-roles probe,
the launch-script parser."""
