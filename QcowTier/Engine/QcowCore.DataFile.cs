using System.Text;
using QcowTier.Format;
using QcowTier.Storage;

namespace QcowTier.Engine;

/// <summary>
/// QEMU's external data file (incompatible bit 2, header extension 0x44415441 holding its name; autoclear
/// bit 1 when it stays a valid raw image). Guest clusters live in the data file at their guest offset
/// and are not refcounted; all metadata (L1, L2, refcounts) stays in the qcow2 file. Because host offset
/// 0 is valid there, an L2 entry with COPIED and offset 0 is a normal cluster (QEMU disambiguates the
/// same way). Not to be confused with the tiered layout's HDD data file: an image may not have both.
/// </summary>
internal sealed partial class QcowCore
{
    private ImageStorage? _external;

    /// <summary>The full path of the external data file, or null.</summary>
    public string? ExternalDataPath { get; private set; }

    /// <summary>The data file name as the image stores it, or null.</summary>
    public string? ExternalDataName { get; private set; }

    public bool HasExternalData => _external is not null;

    /// <summary>data_file_raw: the data file is kept a valid raw image of the virtual disk.</summary>
    public bool ExternalDataRaw => _external is not null && (Header.AutoclearFeatures & QcowHeader.AutoclearDataFileRaw) != 0;

    /// <summary>Classifies an L2 entry the way QEMU does for this image (offset 0 with COPIED is data in an external data file).</summary>
    private ClusterKind Kind(ulong entry)
    {
        if (_external is not null && (entry & (ClusterLayout.Copied | ClusterLayout.Compressed | ClusterLayout.Zero | ClusterLayout.L2OffsetMask)) == ClusterLayout.Copied)
        {
            return ClusterKind.Normal;
        }
        return ClusterKinds.Classify(entry);
    }

    /// <summary>Where new data clusters go: the guest offset in an external data file (no refcount), else the allocator of the tier.</summary>
    private long AllocateData(int tier, long guestCluster, int clusters, out bool fresh)
    {
        if (_external is not null)
        {
            var host = guestCluster << _clusterBits;
            fresh = host >= _external.Length;
            return host;
        }
        return Allocator(tier).Allocate(clusters, out fresh);
    }

    /// <summary>Undoes <see cref="AllocateData"/> (nothing to undo in an external data file).</summary>
    private void FreeDataNow(int tier, long host, int clusters)
    {
        if (_external is null)
        {
            Allocator(tier).FreeNow(host, clusters);
        }
    }

    /// <summary>Opens the external data file the image names (or the caller's override), applying the path policy.</summary>
    private void LoadExternalData(string? overridePath, bool allowAnywhere, QcowCacheMode cacheMode)
    {
        if (Header.Version < 3 || (Header.IncompatibleFeatures & QcowHeader.IncompatExternalDataFile) == 0)
        {
            return;
        }
        if (_tier is not null)
        {
            ThrowHelper.Unsupported(Name, QcowHeader.OffsetIncompatibleFeatures, "incompatible_features", "a tiered image cannot also use a QEMU external data file (data_file)");
        }
        var ext = Header.Extensions.FirstOrDefault(e => e.Type == HeaderExtension.ExternalDataFile);
        string? name = null;
        if (ext is not null)
        {
            var len = Array.IndexOf(ext.Data, (byte)0);
            name = Encoding.UTF8.GetString(ext.Data, 0, len < 0 ? ext.Data.Length : len);
        }
        ExternalDataName = name;
        string path;
        if (overridePath is not null)
        {
            path = Path.GetFullPath(overridePath);
        }
        else if (string.IsNullOrEmpty(name))
        {
            throw new QcowFormatException("the image uses an external data file but names none: 'data-file' is required for this image (QcowOpenOptions.ExternalDataFile)",
                Name, ext?.Offset ?? QcowHeader.OffsetIncompatibleFeatures, "data file name");
        }
        else
        {
            path = ResolveExternalData(name, allowAnywhere, ext!.Offset + 8);
        }
        if (DataFileFactory is null && !System.IO.File.Exists(path))
        {
            throw new QcowFormatException($"Could not open '{path}': No such file or directory (the image's external data file)", Name, ext?.Offset ?? -1, "data file name");
        }
        ExternalDataPath = path;
        _external = OpenDataFile(path, !ReadOnly, create: false, cacheMode);
    }

    /// <summary>
    /// A hostile image must not make us open arbitrary files: the name is resolved against the image's
    /// folder and must stay inside it, unless the caller allows any name (QcowOpenOptions.AllowExternalDataFileAnywhere).
    /// </summary>
    private string ResolveExternalData(string name, bool allowAnywhere, long nameOffset)
    {
        var dir = Name is null ? null : Path.GetDirectoryName(Path.GetFullPath(Name));
        if (Path.IsPathRooted(name))
        {
            if (!allowAnywhere)
            {
                throw new QcowFormatException($"the external data file name '{name}' is absolute; open with QcowOpenOptions.AllowExternalDataFileAnywhere (or name the file with ExternalDataFile) to follow it", Name, nameOffset, "data file name");
            }
            return Path.GetFullPath(name);
        }
        if (dir is null)
        {
            throw new QcowException("an image with an external data file opened from a stream or handle needs QcowOpenOptions.ExternalDataFile");
        }
        var full = Path.GetFullPath(Path.Combine(dir, name));
        var inside = full.StartsWith(dir.EndsWith(Path.DirectorySeparatorChar) ? dir : dir + Path.DirectorySeparatorChar, StringComparison.Ordinal);
        if (!inside && !allowAnywhere)
        {
            throw new QcowFormatException($"the external data file name '{name}' leaves the image's folder; open with QcowOpenOptions.AllowExternalDataFileAnywhere (or name the file with ExternalDataFile) to follow it", Name, nameOffset, "data file name");
        }
        return full;
    }

    /// <summary>
    /// A raw data file must read as the virtual disk: zero-flagged and discarded clusters get zeroes in
    /// it too (partial clusters were already written through the normal write path).
    /// </summary>
    private void ZeroRawData(long start, long end)
    {
        if (!ExternalDataRaw || end <= start)
        {
            return;
        }
        end = Math.Min(end, Size);
        for (var pos = start; pos < end;)
        {
            var n = (int)Math.Min(_zeroCluster.Length, end - pos);
            if (pos < _external!.Length)
            {
                _external.Write(pos, _zeroCluster.AsSpan(0, n));
            }
            pos += n;
        }
        Volatile.Write(ref _unsynced, 1);
    }

    /// <summary>The data file follows the virtual size (QEMU truncates it with the image).</summary>
    private void ResizeExternalData(long newSize)
    {
        if (_external is not null && _external.Length != newSize)
        {
            _external.SetLength(newSize);
            _external.Flush();
        }
    }

    /// <summary>Adds what a new image with an external data file needs to its header (QcowCreator): the bit, the name, the raw flag.</summary>
    internal static void DescribeExternalData(QcowHeader header, string name, bool raw)
    {
        header.IncompatibleFeatures |= QcowHeader.IncompatExternalDataFile;
        if (raw)
        {
            header.AutoclearFeatures |= QcowHeader.AutoclearDataFileRaw;
        }
        header.Extensions.Insert(0, new HeaderExtension(HeaderExtension.ExternalDataFile, Encoding.UTF8.GetBytes(name), 0));
    }
}
