using QcowTier.Cli.Disks;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>qemu-img create's backing file checks (-b, -F, -u and backing_file/backing_fmt in -o).</summary>
internal static class CreateBacking
{
    /// <summary>The backing file's size when the command gave none (and -u was not given); checks the backing file opens.</summary>
    public static long? SizeFrom(string path, string format, CreateOptions options, bool unsafeBacking)
    {
        if (format != "qcow2")
        {
            return null;
        }
        Check(options);
        if (options.Text("backing_file") is not { } backing || unsafeBacking)
        {
            return null;
        }
        var resolved = Combine(path, backing);
        using var disk = DiskOpener.Open(resolved, options.Text("backing_fmt"), writable: false);
        return disk.Size;
    }

    /// <summary>The backing file and its format, with qemu-img's refusals.</summary>
    public static (string? File, string? Format) Check(CreateOptions options)
    {
        var file = options.Text("backing_file");
        var fmt = options.Text("backing_fmt");
        if (file is null)
        {
            if (fmt is not null)
            {
                throw new CliException("Backing format cannot be used without backing file");
            }
            return (null, null);
        }
        if (options.Format != "qcow2")
        {
            throw new CliException($"Backing file not supported for file format '{options.Format}'");
        }
        if (fmt is null)
        {
            throw new CliException("Backing file specified without backing format");
        }
        if (fmt is not ("qcow2" or "raw"))
        {
            throw new CliException($"Unknown driver '{fmt}' (qcowtier handles qcow2 and raw backing files)");
        }
        return (file, fmt);
    }

    /// <summary>QEMU's path_combine: relative to the folder of the image as it was named.</summary>
    public static string Combine(string imagePath, string name)
    {
        if (Path.IsPathRooted(name))
        {
            return name;
        }
        var slash = imagePath.LastIndexOf('/');
        return slash < 0 ? name : imagePath[..(slash + 1)] + name;
    }
}
