package image

import (
	"context"
	"errors"
	"fmt"
	"slices"
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
// Pull follows the PullMissing policy (see PullWith): a registry image
// already in the store under its resolved name is returned without
// contacting the registry, so a tag pulled once stays what it was. A local
// image already in the store (same config) is not copied again. Pulls of
// the same image are serialised, so concurrent callers share one download.
// Every failure is an *errdefs.Error of code ImagePullFailed naming ref;
// cancelling ctx aborts the pull.
func (s *Store) Pull(ctx context.Context, ref string) (*Image, error) {
	return s.PullWith(ctx, ref, PullOptions{})
}

// PullPolicy says when Pull contacts a registry.
type PullPolicy string

// The pull policies. Whatever the policy, a digest-pinned reference
// (repo@sha256:...) whose manifest is in the store is never fetched again:
// its content cannot have changed.
const (
	// PullMissing (the default, also "") fetches an image only when its
	// name is not in the store.
	PullMissing PullPolicy = "missing"
	// PullAlways asks the registry for the tag's manifest digest on every
	// pull (one HEAD request) and fetches the image only when the digest
	// differs from the stored one: a tag pushed again with new content is
	// seen, an unchanged one costs no download. Local transports (oci:,
	// archives) are read again and imported when their image changed.
	PullAlways PullPolicy = "always"
	// PullNever never contacts a registry nor imports: an image that is
	// not in the store fails.
	PullNever PullPolicy = "never"
)

// ParsePullPolicy checks a policy name; "" is PullMissing. An unknown name
// is a ValidationError.
func ParsePullPolicy(s string) (PullPolicy, error) {
	switch p := PullPolicy(s); p {
	case "", PullMissing:
		return PullMissing, nil
	case PullAlways, PullNever:
		return p, nil
	}
	return "", errdefs.New(errdefs.ValidationError, "pull policy %q: want missing, always or never", s)
}

// PullOptions modifies PullWith.
type PullOptions struct {
	Policy PullPolicy // "" is PullMissing
}

// errNotPresent is the cause of a PullNever pull of an absent image.
var errNotPresent = errors.New("not in the image store")

// PullWith is Pull under opts' policy. A PullNever pull of an image that is
// not in the store fails with ImagePullFailed naming the policy.
func (s *Store) PullWith(ctx context.Context, ref string, opts PullOptions) (*Image, error) {
	policy, err := ParsePullPolicy(string(opts.Policy))
	if err != nil {
		return nil, err
	}
	img, err := s.pull(ctx, ref, policy)
	if errors.Is(err, errNotPresent) {
		s.log.Debug("image not in the store; pull policy never", "ref", ref)
		return nil, errdefs.Wrap(errdefs.ImagePullFailed, err, "image %q (pull policy %q)", ref, policy)
	}
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

func (s *Store) pull(ctx context.Context, ref string, policy PullPolicy) (*Image, error) {
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
		return s.pullLocal(ctx, ref, src, policy)
	}

	candidates, err := s.resolve(ref)
	if err != nil {
		return nil, err
	}
	if policy == PullNever {
		// Only what the store has, under any candidate name: no network.
		for _, named := range candidates {
			if img, ok, err := s.present(ctx, named); ok || err != nil {
				return img, err
			}
		}
		return nil, errNotPresent
	}
	var errs pullErrors
	for _, named := range candidates {
		img, err := s.pullNamed(ctx, ref, named, policy)
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

// present returns the store's image for a fully-qualified name, without
// any network access: by name, or for a digest-pinned name by manifest
// digest (an image pulled by tag, or untagged since, is that content), in
// which case the name is recorded for the next lookup.
func (s *Store) present(ctx context.Context, named reference.Named) (*Image, bool, error) {
	src, err := docker.NewReference(named)
	if err != nil {
		return nil, false, err
	}
	name := named.String()
	if rec, err := s.store.Image(name); err == nil {
		img, err := s.describe(ctx, rec.ID, transports.ImageName(src))
		return img, err == nil, err
	}
	canonical, ok := named.(reference.Canonical)
	if !ok {
		return nil, false, nil
	}
	recs, err := s.store.ImagesByDigest(canonical.Digest())
	if err != nil || len(recs) == 0 {
		return nil, false, nil
	}
	id := recs[0].ID
	if err := s.store.AddNames(id, []string{name}); err != nil {
		s.log.Warn("image: record a digest name", "image", id, "name", name, "err", err)
	}
	img, err := s.describe(ctx, id, transports.ImageName(src))
	return img, err == nil, err
}

// pullNamed pulls one fully-qualified registry image, unless the store
// already has an image of that name and the policy does not ask for a
// check (see PullPolicy).
func (s *Store) pullNamed(ctx context.Context, ref string, named reference.Named, policy PullPolicy) (*Image, error) {
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

	_, pinned := named.(reference.Canonical)
	if img, ok, err := s.present(ctx, named); err != nil {
		return nil, err
	} else if ok && (policy != PullAlways || pinned) {
		s.log.Debug("image already present", "ref", ref, "name", name, "image", img.ID)
		return img, nil
	} else if ok {
		// PullAlways: fetch only if the tag names other content now.
		remote, err := docker.GetDigest(ctx, s.sys, src)
		if err != nil {
			return nil, fmt.Errorf("check %s for a newer image: %w", name, err)
		}
		if s.hasManifest(img.ID, remote) {
			s.log.Debug("image up to date", "ref", ref, "name", name, "image", img.ID, "digest", remote)
			return img, nil
		}
		s.log.Info("image changed in the registry; pulling", "ref", ref, "name", name, "old", img.Digest, "new", remote)
	}

	if err := s.copy(ctx, ref, src, named, ""); err != nil {
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
//
// The image is recorded under name (e.g. "oci:/path/layout:latest"), as a
// reference for Lookup and listings; the name moves to the new image when
// the source changes. Under PullNever, an image already imported under
// name is used without reading the source, and nothing is imported.
func (s *Store) pullLocal(ctx context.Context, ref string, src types.ImageReference, policy PullPolicy) (*Image, error) {
	name := localName(src)
	unlock, err := s.pulls.lock(ctx, name)
	if err != nil {
		return nil, err
	}
	defer unlock()

	if policy == PullNever {
		if rec, err := s.store.Image(name); err == nil {
			return s.describe(ctx, rec.ID, name)
		}
	}
	id, err := s.localImageID(ctx, src)
	if err != nil {
		return nil, err
	}
	if _, err := s.store.Image(id); err == nil {
		s.log.Debug("image already present", "ref", ref, "image", id)
		s.nameLocal(id, name)
		return s.describe(ctx, id, name)
	}
	if policy == PullNever {
		return nil, errNotPresent
	}
	if err := s.copy(ctx, ref, src, nil, id); err != nil {
		return nil, err
	}
	s.nameLocal(id, name)
	return s.describe(ctx, id, name)
}

// localName is the name under which an image of a local transport is
// recorded: oci:DIR names itself "oci:DIR:" (no tag), so the empty tag is
// dropped.
func localName(src types.ImageReference) string {
	return strings.TrimSuffix(transports.ImageName(src), ":")
}

// nameLocal records name on image id (taking it from any other image).
func (s *Store) nameLocal(id, name string) {
	if err := s.store.AddNames(id, []string{name}); err != nil {
		s.log.Warn("image: record a local image's name", "image", id, "name", name, "err", err)
	}
}

// hasManifest reports whether the stored image id has the manifest d (its
// own, or the list it was chosen from).
func (s *Store) hasManifest(id string, d digest.Digest) bool {
	rec, err := s.store.Image(id)
	if err != nil {
		return false
	}
	return rec.Digest == d || slices.Contains(rec.Digests, d)
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

// copy runs containers/image's copy from src into the store: in this
// process, or, for an ordinary user, in a child in a user namespace
// (userns.go).
func (s *Store) copy(ctx context.Context, ref string, src types.ImageReference, named reference.Named, id string) error {
	if s.rootless() {
		return s.copyInUserNS(ctx, ref, src, named, id)
	}
	dst, err := istorage.Transport.NewStoreReference(s.store, named, id)
	if err != nil {
		return err
	}
	return s.copyHere(ctx, ref, src, dst)
}

func (s *Store) copyHere(ctx context.Context, ref string, src, dst types.ImageReference) error {
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
