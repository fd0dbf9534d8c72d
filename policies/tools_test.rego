package gateway.tools_test

import rego.v1

import data.gateway.dispatch
import data.gateway.tools

files_agent := {
	"name": "files",
	"image": "agent-gateway/files:dev",
	"capabilities": [],
	"network": "internal",
	"timeout_s": 30,
	"resources": {"memory": "128m", "memory_bytes": 134217728, "cpus": 0.5, "pids": 64},
	"protocol": "mcp",
}

user := {"id": "alice", "roles": ["user"]}

developer := {"id": "dave", "roles": ["user", "developer"]}

call(subject, name, args) := {
	"subject": subject,
	"task": {"agent": "files", "input": args},
	"agent": files_agent,
	"tool": {"name": name, "server_tool": substring(name, 6, -1), "arguments": args},
}

listing(subject, name) := {
	"subject": subject,
	"task": {"agent": "files", "input": {}},
	"agent": files_agent,
	"tool": {"name": name, "server_tool": substring(name, 6, -1)},
}

test_user_reads_under_public if {
	d := tools.decision with input as call(user, "files.read", {"path": "public/readme.txt"})
	d.allow == true
}

test_the_sandbox_is_the_dispatch_policys if {
	inp := call(user, "files.read", {"path": "public/readme.txt"})
	d := tools.decision with input as inp
	d.sandbox == dispatch.sandbox with input as inp
	d.sandbox.memory_bytes == 134217728
}

test_user_may_not_read_outside_public if {
	d := tools.decision with input as call(user, "files.read", {"path": "private/secret.txt"})
	d.allow == false
	some reason in d.reasons
	contains(reason, "argument \"path\" must start with one of")
}

test_dot_dot_does_not_escape_public if {
	d := tools.decision with input as call(user, "files.read", {"path": "public/../private/secret.txt"})
	d.allow == false
}

test_developer_reads_anything if {
	d := tools.decision with input as call(developer, "files.read", {"path": "private/secret.txt"})
	d.allow == true
}

test_other_tools_are_not_restricted_by_arguments if {
	d := tools.decision with input as call(user, "files.add", {"a": 1, "b": 2})
	d.allow == true
}

test_listing_shows_read_to_a_user if {
	d := tools.decision with input as listing(user, "files.read")
	d.allow == true
}

test_no_user_role_is_denied if {
	d := tools.decision with input as call({"id": "x", "roles": []}, "files.add", {"a": 1, "b": 2})
	d.allow == false
	"caller has no 'user' role" in d.reasons
}

test_a_role_rule_restricts_a_whole_tool if {
	d := tools.decision with input as call(user, "files.add", {"a": 1, "b": 2})
		with data.config.tool_rules as {"files.add": {"roles": ["developer"]}}
	d.allow == false
	d2 := tools.decision with input as call(developer, "files.add", {"a": 1, "b": 2})
		with data.config.tool_rules as {"files.add": {"roles": ["developer"]}}
	d2.allow == true
}

test_an_untrusted_image_is_denied if {
	d := tools.decision with input as object.union(
		call(user, "files.add", {"a": 1, "b": 2}),
		{"agent": object.union(files_agent, {"image": "evil/files:latest"})},
	)
	d.allow == false
}
