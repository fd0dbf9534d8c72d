package broken

import rego.v1

allow if {
	input.user ==
}
