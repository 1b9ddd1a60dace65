using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Disks;

/// <summary>
/// Block status through a backing chain, as bdrv_block_status_above walks it for qemu-img map, convert and
/// compare: runs this image does not allocate are asked of the backing file (depth + 1), and beyond the
/// backing file's end they read as zeroes at this depth.
/// </summary>
internal sealed partial class QcowDisk
{
    private readonly int _depth;
    private Disk? _backingDisk;

    /// <summary>The backing file as a disk of its own (opened without its backing: it asks its own backing disk in turn).</summary>
    private Disk? BackingDisk()
    {
        if (_backingDisk is not null || Image.FullBackingFileName is not { } path)
        {
            return _backingDisk;
        }
        if (_depth >= QcowImage.MaxBackingDepth)
        {
            throw new CliException($"Could not open '{FileName}': the backing chain is deeper than {QcowImage.MaxBackingDepth} images");
        }
        var format = Image.BackingFormat ?? DiskOpener.Probe(path);
        _backingDisk = format switch
        {
            "qcow2" => new QcowDisk(path, writable: false, Cache, noBacking: true, _depth + 1),
            "raw" => new RawDisk(path, writable: false, Cache),
            _ => throw new CliException($"Could not open '{path}': Unknown driver '{format}'"),
        };
        return _backingDisk;
    }

    private IEnumerable<BlockStatus> ChainStatus(long offset, long length)
    {
        foreach (var s in OwnStatus(offset, length))
        {
            if (s.Present || Image.BackingFile is null || BackingDisk() is not { } child)
            {
                yield return s;
                continue;
            }
            var inside = Math.Clamp(child.Size - s.Start, 0, s.Length);
            if (inside > 0)
            {
                foreach (var c in child.GetStatus(s.Start, inside))
                {
                    yield return c with { Depth = c.Depth + 1, File = c.Offset is null ? null : c.File ?? child.FileName, Tier = null };
                }
            }
            if (inside < s.Length)
            {
                yield return s with { Start = s.Start + inside, Length = s.Length - inside };
            }
        }
    }
}
