package mixed_test

import rego.v1

import data.conflict
import data.mixed

test_limit_is_ten if {
	mixed.limit == 10
}

test_limit_is_eleven if {
	mixed.limit == 11
}

test_divide_by_zero if {
	mixed.ratio == 1 with input as {"n": 0}
}

test_not_boolean := 42

test_with_arg(x) if {
	x == 1
}

todo_test_skipped if {
	false
}

default test_default_false := false
