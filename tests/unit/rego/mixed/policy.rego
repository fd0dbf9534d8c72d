package mixed

import rego.v1

limit := 10

ratio := limit / input.n
