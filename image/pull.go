package image

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/containers/image/v5/copy"
	"github.com/containers/image/v5/docker"
	dockerarchive "github.com/containers/image/v5/docker/archive"
	"github.com/containers/image/v5/docker/reference"
	ociarchive "github.com/containers/image/v5/oci/archive"
	"github.com/containers/image/v5/oci/layout"
	"github.com/containers/image/v5/pkg/shortnames"
	"github.com/containers/image/v5/pkg/sysregistriesv2"
	"github.com/containers/image/v5/signature"
	istorage "github.com/containers/image/v5/storage"
	"github.com/containers/image/v5/transports"
	"github.com/containers/image/v5/types"
	"github.com/opencontainers/go-digest"

	"github.com/boxrun/boxrun/errdefs"
)

// localTransports are the transports, besides docker://, that Pull takes
// with an explicit "name:" prefix.
var localTransports = []types.ImageTransport{layout.Transport, ociarchive.Transport, dockerarchive.Transport}

// Pull makes the image named by ref available in the store and describes
// it. ref is one of:
//
//   - a docker:// reference (docker://busybox means docker.io/library/busybox:latest);
//   - a bare name, resolved with registries.conf: a fully-qualified name
//     (127.0.0.1:5000/library/busybox:latest, repo@sha256:...) as is, a
//     short name (busybox, alpine:3.20) through its alias or else each
//     unqualified-search registry in turn, the first that pulls winning;
//     with neither configured, a short name means docker.io, as in Docker;
//   - oci:DIR[:TAG], oci-archive:FILE[:TAG] or docker-archive:FILE[:REF].
//
// A registry image already in the store under its resolved name is
// returned without contacting the registry, so a tag pulled once stays
// what it was. A local image already in the store (same config) is not
// copied again. Pulls of the same image are serialised, so concurrent
// callers share one download. Every failure is an *errdefs.Error of code
// ImagePullFailed naming ref; cancelling ctx aborts the pull.
func (s *Store) Pull(ctx context.Context, ref string) (*Image, error) {
	img, err := s.pull(ctx, ref)
	if err != nil {
		if s.ctx.Err() != nil && !errors.Is(err, errClosed) {
			err = fmt.Errorf("%w: %w", errClosed, err)
		}
		if cause := context.Cause(ctx); cause != nil && !errors.Is(err, cause) {
			err = fmt.Errorf("%w: %w", cause, err)
		}
		s.log.Warn("image pull failed", "ref", ref, "err", err)
		return nil, errdefs.Wrap(errdefs.ImagePullFailed, err, "pull %q", ref)
	}
	return img, nil
}

func (s *Store) pull(ctx context.Context, ref string) (*Image, error) {
	if err := s.enter(); err != nil {
		return nil, err
	}
	defer s.busy.Done()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(s.ctx, cancel)() // Close aborts the pull

	if src, ok, err := parseLocal(ref); ok {
		if err != nil {
			return nil, err
		}
		return s.pullLocal(ctx, ref, src)
	}

	candidates, err := s.resolve(ref)
	if err != nil {
		return nil, err
	}
	var errs pullErrors
	for _, named := range candidates {
		img, err := s.pullNamed(ctx, ref, named)
		if err == nil {
			return img, nil
		}
		if len(candidates) == 1 {
			return nil, err
		}
		errs = append(errs, fmt.Errorf("%s: %w", named, err))
		if ctx.Err() != nil {
			break
		}
	}
	return nil, errs
}

// parseLocal parses ref if it names one of the local transports.
func parseLocal(ref string) (src types.ImageReference, ok bool, err error) {
	for _, tr := range localTransports {
		if rest, found := strings.CutPrefix(ref, tr.Name()+":"); found {
			src, err := tr.ParseReference(rest)
			return src, true, err
		}
	}
	return nil, false, nil
}

// resolve turns a docker:// reference or a bare name into the
// fully-qualified names to try, in order, without any network access.
func (s *Store) resolve(ref string) ([]reference.Named, error) {
	if rest, ok := strings.CutPrefix(ref, docker.Transport.Name()+"://"); ok {
		named, err := reference.ParseNormalizedNamed(rest)
		if err != nil {
			return nil, err
		}
		return []reference.Named{reference.TagNameOnly(named)}, nil
	}

	resolved, err := shortnames.Resolve(s.sys, ref)
	if err != nil {
		// Without aliases nor search registries configured (the common
		// case on hosts without containers-common), do what Docker does
		// rather than refusing every short name.
		if shortnames.IsShortName(ref) {
			if usr, uerr := sysregistriesv2.UnqualifiedSearchRegistries(s.sys); uerr == nil && len(usr) == 0 {
				named, nerr := reference.ParseNormalizedNamed(ref)
				if nerr == nil {
					return []reference.Named{reference.TagNameOnly(named)}, nil
				}
			}
		}
		return nil, err
	}
	if d := resolved.Description(); d != "" {
		s.log.Debug(d)
	}
	names := make([]reference.Named, 0, len(resolved.PullCandidates))
	for _, c := range resolved.PullCandidates {
		names = append(names, c.Value)
	}
	return names, nil
}

// pullNamed pulls one fully-qualified registry image, unless the store
// already has an image of that name.
func (s *Store) pullNamed(ctx context.Context, ref string, named reference.Named) (*Image, error) {
	src, err := docker.NewReference(named)
	if err != nil {
		return nil, err
	}
	name := named.String()
	unlock, err := s.pulls.lock(ctx, name)
	if err != nil {
		return nil, err
	}
	defer unlock()

	if rec, err := s.store.Image(name); err == nil {
		s.log.Debug("image already present", "ref", ref, "name", name, "image", rec.ID)
		return s.describe(ctx, rec.ID, transports.ImageName(src))
	}

	dst, err := istorage.Transport.NewStoreReference(s.store, named, "")
	if err != nil {
		return nil, err
	}
	if err := s.copy(ctx, ref, src, dst); err != nil {
		return nil, err
	}
	rec, err := s.store.Image(name)
	if err != nil {
		return nil, fmt.Errorf("pulled image not found in store: %w", err)
	}
	return s.describe(ctx, rec.ID, transports.ImageName(src))
}

// pullLocal imports an image from a local transport unless the store
// already holds it. The storage ID is chosen here, the way
// containers/storage derives it from a registry pull (the config digest),
// so that the check costs no layer copy, and so that an archive of an
// image pulled before shares its layers and record.
func (s *Store) pullLocal(ctx context.Context, ref string, src types.ImageReference) (*Image, error) {
	// oci:DIR names itself "oci:DIR:" (no tag); drop the empty tag.
	name := strings.TrimSuffix(transports.ImageName(src), ":")
	unlock, err := s.pulls.lock(ctx, name)
	if err != nil {
		return nil, err
	}
	defer unlock()

	id, err := s.localImageID(ctx, src)
	if err != nil {
		return nil, err
	}
	if _, err := s.store.Image(id); err == nil {
		s.log.Debug("image already present", "ref", ref, "image", id)
		return s.describe(ctx, id, name)
	}
	dst, err := istorage.Transport.NewStoreReference(s.store, nil, id)
	if err != nil {
		return nil, err
	}
	if err := s.copy(ctx, ref, src, dst); err != nil {
		return nil, err
	}
	return s.describe(ctx, id, name)
}

// localImageID returns the storage ID that src's image (the instance for
// this platform, if src is a list) gets in the store.
func (s *Store) localImageID(ctx context.Context, src types.ImageReference) (string, error) {
	img, err := src.NewImage(ctx, s.sys)
	if err != nil {
		return "", err
	}
	defer img.Close()
	config := img.ConfigInfo().Digest
	if err := config.Validate(); err != nil {
		return "", fmt.Errorf("image config digest: %w", err)
	}
	if config.Algorithm() != digest.SHA256 {
		// Storage IDs are 64 hex digits.
		config = digest.FromString(config.String())
	}
	return config.Encoded(), nil
}

// copy runs containers/image's copy from src into the store.
func (s *Store) copy(ctx context.Context, ref string, src, dst types.ImageReference) error {
	// PolicyContext is stateful and not safe for concurrent use: one per copy.
	policy, err := signature.NewPolicyContext(&signature.Policy{
		Default: signature.PolicyRequirements{signature.NewPRInsecureAcceptAnything()},
	})
	if err != nil {
		return err
	}
	defer func() { _ = policy.Destroy() }()

	opts := &copy.Options{
		SourceCtx:      s.sys,
		DestinationCtx: s.sys,
		// Signatures are not verified (see the package doc), so do not
		// fetch or store them.
		RemoveSignatures: true,
	}
	if fn := s.progressFor(ctx); fn != nil {
		ch, wait := pumpProgress(ref, fn)
		opts.Progress, opts.ProgressInterval = ch, 200*time.Millisecond
		defer wait()
	}

	start := time.Now()
	s.log.Info("pulling image", "ref", ref, "source", transports.ImageName(src))
	if _, err := copy.Image(ctx, policy, dst, src, opts); err != nil {
		return err
	}
	s.log.Info("pulled image", "ref", ref, "source", transports.ImageName(src), "duration", time.Since(start))
	return nil
}

// pullErrors are the failures of every candidate of a short name.
type pullErrors []error

func (e pullErrors) Error() string {
	msgs := make([]string, len(e))
	for i, err := range e {
		msgs[i] = err.Error()
	}
	return fmt.Sprintf("%d candidates failed: %s", len(e), strings.Join(msgs, "; "))
}

func (e pullErrors) Unwrap() []error { return e }
