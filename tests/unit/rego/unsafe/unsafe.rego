package unsafe

import rego.v1

allow if {
	x == 1
}
