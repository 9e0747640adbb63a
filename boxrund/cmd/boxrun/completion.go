package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/boxrun/boxrun/boxrund/client"
)

// cmdCompletion prints a completion script. Box names come from the
// server when one answers (`boxrun __complete boxes`, which never starts
// one).
func cmdCompletion(a *app, ctx context.Context, args []string) error {
	f := newFlags(a, "completion")
	pos, _, err := a.parseArgs(f, args, -1)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return usagef("completion needs a shell: bash, zsh or fish")
	}
	switch pos[0] {
	case "bash":
		fmt.Fprint(a.stdout, bashCompletion(a))
	case "zsh":
		fmt.Fprint(a.stdout, "#compdef boxrun\n# boxrun completion for zsh, through bash's: source <(boxrun completion zsh)\nautoload -U +X compinit && compinit\nautoload -U +X bashcompinit && bashcompinit\n"+bashCompletion(a))
	case "fish":
		fmt.Fprint(a.stdout, fishCompletion(a))
	default:
		return usagef("completion: unknown shell %q (bash, zsh or fish)", pos[0])
	}
	return nil
}

func visible() []*command {
	var out []*command
	for _, c := range commands {
		if !c.hidden {
			out = append(out, c)
		}
	}
	return out
}

// commandFlags lists a command's flags (-x, --long), read from its usage.
func commandFlags(a *app, name string) []string {
	c := lookup(name)
	if c == nil || c.name == "serve" || c.name == "help" {
		if name == "serve" {
			return []string{"--host", "--port", "--socket", "--data-dir", "--token", "--log-level", "--version"}
		}
		return nil
	}
	var buf bytes.Buffer
	sub := &app{stdout: &buf, stderr: io.Discard, getenv: func(string) string { return "" }, noAutostart: true}
	c.run(sub, context.Background(), []string{"-h"})
	var out []string
	in := false
	for _, l := range strings.Split(buf.String(), "\n") {
		if strings.HasPrefix(l, "Flags:") {
			in = true
			continue
		}
		if !in {
			continue
		}
		for _, w := range strings.Fields(l) {
			w = strings.TrimSuffix(w, ",")
			if strings.HasPrefix(w, "-") {
				out = append(out, w)
			} else {
				break
			}
		}
	}
	return out
}

func bashCompletion(a *app) string {
	var names []string
	var flagCases strings.Builder
	for _, c := range visible() {
		names = append(names, c.name)
		if fl := commandFlags(a, c.name); len(fl) > 0 {
			fmt.Fprintf(&flagCases, "        %s) flags=%q;;\n", c.name, strings.Join(fl, " "))
		}
	}
	return fmt.Sprintf(`# boxrun completion for bash: source <(boxrun completion bash)
_boxrun() {
    local cur="${COMP_WORDS[COMP_CWORD]}"
    if [[ $COMP_CWORD -eq 1 ]]; then
        COMPREPLY=( $(compgen -W %q -- "$cur") )
        return
    fi
    local cmd="${COMP_WORDS[1]}" flags=""
    case "$cmd" in
%s    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=( $(compgen -W "$flags" -- "$cur") )
        return
    fi
    case "$cmd" in
        stop|start|rm|exec|execs|attach)
            COMPREPLY=( $(compgen -W "$(boxrun __complete boxes 2>/dev/null)" -- "$cur") );;
        create|shell|run)
            COMPREPLY=( $(compgen -W "$(boxrun __complete images 2>/dev/null)" -- "$cur") );;
        cp)
            compopt -o nospace 2>/dev/null
            COMPREPLY=( $(compgen -f -- "$cur") $(compgen -W "$(boxrun __complete boxes 2>/dev/null | sed 's/$/:/')" -- "$cur") );;
        completion)
            COMPREPLY=( $(compgen -W "bash zsh fish" -- "$cur") );;
        help)
            COMPREPLY=( $(compgen -W %q -- "$cur") );;
        *)
            COMPREPLY=( $(compgen -f -- "$cur") );;
    esac
}
complete -F _boxrun boxrun
`, strings.Join(names, " "), flagCases.String(), strings.Join(names, " "))
}

func fishCompletion(a *app) string {
	var b strings.Builder
	b.WriteString("# boxrun completion for fish: boxrun completion fish | source\ncomplete -c boxrun -f\n")
	for _, c := range visible() {
		fmt.Fprintf(&b, "complete -c boxrun -n __fish_use_subcommand -a %s -d %s\n", c.name, fishQuote(c.summary))
	}
	b.WriteString("complete -c boxrun -n '__fish_seen_subcommand_from stop start rm exec execs attach' -a '(boxrun __complete boxes 2>/dev/null)'\n")
	b.WriteString("complete -c boxrun -n '__fish_seen_subcommand_from create shell run' -a '(boxrun __complete images 2>/dev/null)'\n")
	b.WriteString("complete -c boxrun -n '__fish_seen_subcommand_from cp' -F -a '(boxrun __complete boxes 2>/dev/null | string replace -r \"\\$\" \":\")'\n")
	b.WriteString("complete -c boxrun -n '__fish_seen_subcommand_from completion' -a 'bash zsh fish'\n")
	for _, c := range visible() {
		for _, fl := range commandFlags(a, c.name) {
			opt := "-l " + strings.TrimPrefix(fl, "--")
			if !strings.HasPrefix(fl, "--") {
				opt = "-s " + strings.TrimPrefix(fl, "-")
			}
			fmt.Fprintf(&b, "complete -c boxrun -n '__fish_seen_subcommand_from %s' %s\n", c.name, opt)
		}
	}
	return b.String()
}

func fishQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `\'`) + "'" }

// cmdComplete serves the completion scripts: "boxes" (ids and names, from
// a server that answers; none is started), "images" (aliases), "flags
// CMD".
func cmdComplete(a *app, ctx context.Context, args []string) error {
	if len(args) == 0 {
		return nil
	}
	switch args[0] {
	case "boxes":
		c, err := client.Discover(ctx, client.EnvFrom(a.getenv), 300*time.Millisecond)
		if err != nil {
			return nil
		}
		ctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		boxes, err := c.ListBoxes(ctx, "")
		if err != nil {
			return nil
		}
		for _, b := range boxes {
			if n := b.DisplayName(); n != "" {
				fmt.Fprintln(a.stdout, n)
			}
			fmt.Fprintln(a.stdout, b.ID)
		}
	case "images":
		for _, al := range aliases {
			fmt.Fprintln(a.stdout, al.Name)
		}
	case "flags":
		if len(args) > 1 {
			fmt.Fprintln(a.stdout, strings.Join(commandFlags(a, args[1]), " "))
		}
	}
	return nil
}
