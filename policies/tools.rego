# Tools of MCP servers behind the hub (agents.yaml entries with protocol: mcp): may this
# caller call this tool with these arguments, and in what sandbox does its server run?
#
# input:  the dispatch input ({"subject", "task", "agent", "request"}) plus
#         "tool": {"name": "files.read", "server_tool": "read", "arguments": {...}}
#         tools/list asks which tools a caller may see with no "arguments": a rule on
#         arguments cannot hold then, and decides (and is logged) at call time.
# data:   data.config.tool_rules (policies/data.json), by hub tool name:
#         {"roles": [...]}                       only these roles may call the tool
#         {"argument_prefixes": {arg: [...]}}    each such argument starts with one prefix
#         {"unrestricted_roles": [...]}          these roles skip argument_prefixes
# output: decision = {"allow": bool, "reasons": [string], "sandbox": {...}}; the sandbox and
#         the agent-level refusals are the dispatch policy's.
package gateway.tools

import rego.v1

import data.gateway.dispatch

cfg := data.config

roles := {r | some r in input.subject.roles}

rule := cfg.tool_rules[input.tool.name]

# --- refusals -------------------------------------------------------------------------

deny contains msg if {
	some msg in dispatch.deny
}

deny contains msg if {
	allowed := {r | some r in rule.roles}
	count(allowed) > 0
	count(roles & allowed) == 0
	msg := sprintf("tool %q requires one of the roles %v", [input.tool.name, rule.roles])
}

deny contains msg if {
	restricted
	some arg, prefixes in rule.argument_prefixes
	value := input.tool.arguments[arg]
	not under_prefix(value, prefixes)
	msg := sprintf("tool %q: argument %q must start with one of %v (and hold no '..')", [input.tool.name, arg, prefixes])
}

restricted if count(roles & {r | some r in rule.unrestricted_roles}) == 0

under_prefix(value, prefixes) if {
	is_string(value)
	not contains(value, "..")
	some prefix in prefixes
	startswith(value, prefix)
}

# --- the answer -----------------------------------------------------------------------

default allow := false

allow if count(deny) == 0

decision := {"allow": true, "reasons": ["allowed"], "sandbox": dispatch.sandbox} if {
	allow
} else := {"allow": false, "reasons": deny}
