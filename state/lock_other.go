//go:build !unix

package state

import "os"

// Without flock, badger's own directory lock is what turns a second engine
// away (Open maps its error to the same "in use by another engine" error).
func lockDir(dir string) (*os.File, error) { return nil, nil }

func unlockDir(f *os.File) {}
