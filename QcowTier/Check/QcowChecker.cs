using QcowTier.Format;
using QcowTier.Storage;

namespace QcowTier.Check;

/// <summary>qemu-img check for qcow2: walks L1, L2 and refcount structures on disk (placeholder until the checker lands).</summary>
internal static class QcowChecker
{
    public static QcowCheckResult Run(ImageStorage file, QcowHeader header, QcowRepairMode mode)
    {
        _ = file;
        _ = header;
        _ = mode;
        return new QcowCheckResult();
    }
}
