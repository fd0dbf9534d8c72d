package conflict

import rego.v1

level := "high" if input.limit > 5

level := "ten" if input.limit == 10
