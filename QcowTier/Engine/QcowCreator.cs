using System.Buffers.Binary;
using System.Numerics;
using QcowTier.Format;
using QcowTier.Storage;

namespace QcowTier.Engine;

/// <summary>
/// Creates an image the way QEMU's qcow2_co_create does: a minimal three-cluster image
/// (header, refcount table, one refcount block) of size zero, then a resize to the wanted size,
/// so creation and growth share one code path.
/// </summary>
internal static class QcowCreator
{
    /// <summary>QEMU 7.2 writes its feature name table only into header clusters of at least this size.</summary>
    internal const int QemuFeatureTableMinCluster = 8192;

    public static void Validate(long size, QcowCreateOptions o)
    {
        if (o.ClusterSize < 512 || o.ClusterSize > 2 * 1024 * 1024 || !BitOperations.IsPow2(o.ClusterSize))
        {
            throw new ArgumentException($"Cluster size must be a power of two between 512 and 2048k (got {o.ClusterSize})", nameof(o));
        }
        if (o.RefcountBits is < 1 or > 64 || !BitOperations.IsPow2(o.RefcountBits))
        {
            throw new ArgumentException($"Refcount width must be a power of two and may not exceed 64 bits (got {o.RefcountBits})", nameof(o));
        }
        if (o.Compat == QcowCompat.V2 && o.RefcountBits != 16)
        {
            throw new ArgumentException("Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)", nameof(o));
        }
        if (o.Compat == QcowCompat.V2 && o.LazyRefcounts)
        {
            throw new ArgumentException("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)", nameof(o));
        }
        if (o.Tier is not null && o.Compat == QcowCompat.V2)
        {
            throw new ArgumentException("Tiered images need compatibility level 1.1 (compat=1.1)", nameof(o));
        }
        BackingNames.Validate(o);
        if (o.Compat == QcowCompat.V2 && o.CompressionType != QcowCompressionType.Zlib)
        {
            throw new ArgumentException("Non-zlib compression type is only supported with compatibility level 1.1 and above (use version=v3 or greater)", nameof(o));
        }
        if (o.CompressionType is not (QcowCompressionType.Zlib or QcowCompressionType.Zstd))
        {
            throw new ArgumentException($"Unknown compression type {o.CompressionType}", nameof(o));
        }
        if (o.DataFile is not null && o.Compat == QcowCompat.V2)
        {
            throw new ArgumentException("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)", nameof(o));
        }
        if (o.DataFileRaw && o.DataFile is null)
        {
            throw new ArgumentException("data-file-raw requires data-file", nameof(o));
        }
        if (o.DataFile is not null && o.Tier is not null)
        {
            throw new ArgumentException("A tiered image cannot also use a QEMU external data file (data_file)", nameof(o));
        }
        if (o.ExtendedL2 && o.Compat == QcowCompat.V2)
        {
            throw new ArgumentException("Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)", nameof(o));
        }
        if (o.ExtendedL2 && o.ClusterSize < 16384)
        {
            throw new ArgumentException("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes", nameof(o));
        }
        if (o.ExtendedL2 && (o.Tier is not null || o.Preallocation != QcowPreallocation.Off))
        {
            throw new ArgumentException("Extended L2 entries cannot be combined with tiering or preallocation yet", nameof(o));
        }
        if (size < 0 || size > QcowHeader.MaxVirtualSize)
        {
            throw new ArgumentOutOfRangeException(nameof(size), $"image size {size} is out of range");
        }
    }

    /// <summary>
    /// Where a new external data file goes (relative names: the image's folder) and the name stored for
    /// it: relative to the image's folder when it lies inside it, so the image opens without options.
    /// </summary>
    private static (string Path, string Stored) ExternalDataLocation(string? imageName, string name)
    {
        var dir = imageName is null ? null : Path.GetDirectoryName(Path.GetFullPath(imageName));
        if (dir is null)
        {
            return (Path.GetFullPath(name), name);
        }
        var full = Path.GetFullPath(Path.Combine(dir, name));
        var prefix = dir.EndsWith(Path.DirectorySeparatorChar) ? dir : dir + Path.DirectorySeparatorChar;
        return (full, full.StartsWith(prefix, StringComparison.Ordinal) ? Path.GetRelativePath(dir, full) : name);
    }

    public static QcowCore Create(ImageStorage file, long size, QcowCreateOptions o, Func<string, bool, bool, ImageStorage>? dataFileFactory = null, BackingContext? backing = null)
    {
        Validate(size, o);
        // As qemu-img create: QEMU addresses whole 512-byte sectors (it reads the size as size / 512 sectors),
        // so a size in bytes is rounded up rather than leaving a tail QEMU cannot see.
        size = (size + QcowHeader.SectorSize - 1) & ~(long)(QcowHeader.SectorSize - 1);
        var cs = o.ClusterSize;
        var header = new QcowHeader
        {
            Version = (uint)o.Compat,
            ClusterBits = BitOperations.Log2((uint)cs),
            Size = 0,
            L1Size = 0,
            L1TableOffset = 0,
            RefcountTableOffset = cs,
            RefcountTableClusters = 1,
            RefcountOrder = BitOperations.Log2((uint)o.RefcountBits),
            CompatibleFeatures = o.LazyRefcounts ? QcowHeader.CompatLazyRefcounts : 0,
            // As QEMU: only a non-default compression type sets the field and incompatible bit 3.
            CompressionType = (byte)o.CompressionType,
            IncompatibleFeatures = (o.CompressionType == QcowCompressionType.Zstd ? QcowHeader.IncompatCompressionType : 0)
                | (o.ExtendedL2 ? QcowHeader.IncompatExtendedL2 : 0),
        };
        if (o.BackingFile is not null && o.BackingFormat is not null)
        {
            // QEMU writes the backing format extension first.
            header.Extensions.Add(new HeaderExtension(HeaderExtension.BackingFormat, System.Text.Encoding.UTF8.GetBytes(o.BackingFormat), 0));
        }
        // An image with an external data file gets QEMU 7.2's header exactly: the feature name table only
        // with clusters of 8 KiB and more (QEMU leaves it out of smaller ones), after the data file name.
        if (o.Compat == QcowCompat.V3 && (o.DataFile is null || cs >= QemuFeatureTableMinCluster)
            && BackingNames.FitsWithFeatureTable(header, cs, o.BackingFile))
        {
            header.Extensions.Add(new HeaderExtension(HeaderExtension.FeatureNameTable, HeaderExtension.QemuFeatureNameTable(), 0));
        }
        string? dataPath = null;
        if (o.DataFile is not null)
        {
            (dataPath, var stored) = ExternalDataLocation(file.Name, o.DataFile);
            QcowCore.DescribeExternalData(header, stored, o.DataFileRaw);
            using var data = dataFileFactory is not null ? dataFileFactory(dataPath, true, true) : FileStorage.Open(dataPath, writable: true, create: true);
            data.SetLength(0);
            data.Flush();
        }
        var image = new byte[3 * cs];
        header.WriteNew(image.AsSpan(0, cs));
        BackingNames.WriteName(header, image.AsSpan(0, cs), o.BackingFile);
        BinaryPrimitives.WriteUInt64BigEndian(image.AsSpan(cs), (ulong)(2 * cs));
        for (var i = 0; i < 3; i++)
        {
            RefcountBlock.Set(image.AsSpan(2 * cs, cs), i, header.RefcountOrder, 1);
        }
        file.SetLength(0);
        file.Write(0, image);
        file.Flush();
        backing ??= new BackingContext { Policy = o.BackingPolicy };
        var core = QcowCore.Open(file, readOnly: false, dataFileFactory: dataFileFactory, backing: backing, externalDataFile: dataPath);
        try
        {
            if (o.Tier is not null)
            {
                core.AttachTier(o.Tier.DataFile, (int)o.Tier.DefaultTier, o.Tier.SsdBudget);
            }
            if (size > 0)
            {
                // As QEMU: creation is a truncate of the empty image, preallocating on the way.
                core.Resize(size, o.Preallocation);
            }
            return core;
        }
        catch
        {
            core.Dispose();
            throw;
        }
    }
}
